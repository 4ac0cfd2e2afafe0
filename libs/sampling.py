"""UniDiffuser-v1 text-to-image as the official sampler does it, with personalized adapters.

The state is the joint vector [flattened z, clip_img]; every solver step runs the conditional pass
(`t_text = 0`) and the unconditional pass in one batched forward and mixes them as
`cond + s·(cond − uncond)`. The unconditional text is fresh Gaussian noise at `t_text = 1000`
(`true_uncond`, the official default) or the encoded empty prompt at `t_text = 0` (`empty_token`).

Every image has its own random generator, keyed by (seed, prompt index, sample index), that draws its
initial latent, its initial clip_img and its `true_uncond` text noise; so an image does not change when
prompts are added after it or other prompts are edited, nor with the batch size.
"""
from __future__ import annotations

import hashlib
import math
import re
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import ml_collections
import torch
from einops import rearrange
from PIL import Image, ImageDraw
from torch import Tensor, nn
from tqdm import tqdm

from libs.adapters import Personalization, count_finetuned_parameters, load_personalization, merge_lora
from libs.autoencoder import AutoencoderKL, load_autoencoder
from libs.caption_decoder import CaptionDecoderPrefix, load_caption_decoder
from libs.checkpoint import atomic_path
from libs.clip import CLIPTextEncoder, load_text_encoder
from libs.download import SAMPLING_WEIGHTS, ensure_weights
from libs.dpm_solver import N_TRAIN_STEPS, dpm_solver_sample
from libs.prompts import image_name
from libs.prompts import load_prompts as read_prompt_file
from libs.uvit import load_uvit

CFG_MODES = ("true_uncond", "empty_token")
DEFAULT_CLASS_WORDS = ("boy", "girl")
GRID_FILE = "grid.jpg"
GRID_CELL = 160
JPEG_QUALITY = 95

TextNoiseFn = Callable[[Tensor], Tensor]
"""`text_noise_fn(text) -> noise shaped like text`: the `true_uncond` text of one model call."""


class SamplingInputError(ValueError):
    """Bad user input (prompt file, output folder): reported before any file is written."""


# --- the sampler -----------------------------------------------------------------------------------


def combine_joint(z: Tensor, clip_img: Tensor) -> Tensor:
    """[B, C, H, W] and [B, 1, D] -> the solver state [B, C·H·W + D]."""
    return torch.cat([z.flatten(1), clip_img.flatten(1)], dim=1)


def split_joint(x: Tensor, z_shape: Sequence[int], clip_img_dim: int) -> tuple[Tensor, Tensor]:
    """The inverse of `combine_joint`."""
    channels, height, width = z_shape
    z, clip_img = x.split([channels * height * width, clip_img_dim], dim=1)
    return rearrange(z, "B (C H W) -> B C H W", C=channels, H=height, W=width), clip_img.unsqueeze(1)


def t2i_sample(nnet: nn.Module, text: Tensor, z_init: Tensor, clip_img_init: Tensor, steps: int, scale: float,
               cfg_mode: str = "true_uncond", data_type: int = 1, *, empty_text: Tensor | None = None,
               text_noise_fn: TextNoiseFn | None = None,
               callback: Callable[[int, float, Tensor], None] | None = None) -> tuple[Tensor, Tensor]:
    """Denoise (z, clip_img) from t=1 to t=1e-3 with DPM-Solver++, conditioned on `text` [B, 77, text_dim].

    `empty_text` ([77, text_dim], the encoded "") is needed for `empty_token`; `text_noise_fn` draws the
    `true_uncond` text (default `torch.randn_like`). Scale 0 skips the unconditional pass, as upstream.
    Returns the final latents [B, C, H, W] and clip_img [B, 1, D].
    """
    if cfg_mode not in CFG_MODES:
        raise ValueError(f"cfg_mode {cfg_mode!r} not in {CFG_MODES}")
    if cfg_mode == "empty_token" and scale != 0 and empty_text is None:
        raise ValueError("cfg_mode 'empty_token' needs empty_text (the encoded empty prompt)")
    if text.shape[0] != z_init.shape[0] or clip_img_init.shape[0] != z_init.shape[0]:
        raise ValueError(f"batch sizes differ: text {text.shape[0]}, z {z_init.shape[0]}, clip_img {clip_img_init.shape[0]}")
    z_shape, clip_img_dim = tuple(z_init.shape[1:]), clip_img_init.shape[-1]
    noise_text = text_noise_fn or torch.randn_like
    batch = z_init.shape[0]
    types = torch.full((batch,), data_type, dtype=torch.long, device=z_init.device)

    def noise_fn(x: Tensor, t_net: Tensor) -> Tensor:
        z, clip_img = split_joint(x, z_shape, clip_img_dim)
        t_text = torch.zeros_like(t_net)
        if scale == 0:
            z_out, clip_img_out, _ = nnet(z, clip_img, text, t_net, t_text, types)
            return combine_joint(z_out, clip_img_out).float()
        if cfg_mode == "true_uncond":
            uncond_text, t_uncond = noise_text(text), torch.full_like(t_net, N_TRAIN_STEPS)
        else:
            uncond_text, t_uncond = empty_text.to(text).expand_as(text), t_text
        z_out, clip_img_out, _ = nnet(torch.cat([z, z]), torch.cat([clip_img, clip_img]),
                                      torch.cat([text, uncond_text]), torch.cat([t_net, t_net]),
                                      torch.cat([t_text, t_uncond]), torch.cat([types, types]))
        cond, uncond = combine_joint(z_out, clip_img_out).float().chunk(2)
        return cond + scale * (cond - uncond)

    x = dpm_solver_sample(noise_fn, combine_joint(z_init, clip_img_init), steps, callback=callback)
    return split_joint(x, z_shape, clip_img_dim)


def to_pil_images(pixels: Tensor) -> list[Image.Image]:
    """Decoder output in [-1, 1] -> RGB images (0.5·(x+1) clamped to [0, 1], rounded)."""
    pixels = (0.5 * (pixels.float() + 1.0)).clamp(0.0, 1.0)
    array = (pixels * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(image) for image in array]


def sample_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from a stable hash of `keys` (e.g. seed, prompt index, sample index)."""
    digest = hashlib.sha256("/".join(str(int(k)) for k in keys).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


# --- everything loaded once ------------------------------------------------------------------------


def inference_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (the official autocast dtype), fp32 elsewhere."""
    return torch.float16 if device.type == "cuda" else torch.float32


@dataclass
class T2IPipeline:
    """U-ViT (adapters merged), VAE, CLIP text encoder and the caption decoder's prefix; never GPT-2."""

    config: ml_collections.ConfigDict
    nnet: nn.Module
    autoencoder: AutoencoderKL
    text_encoder: CLIPTextEncoder
    caption_decoder: CaptionDecoderPrefix
    device: torch.device
    personalization: Personalization | None
    finetuned_parameters: int | None
    empty_text: Tensor

    @property
    def dtype(self) -> torch.dtype:
        return inference_dtype(self.device)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """Prompts -> the U-ViT's low-dimensional text tokens [B, 77, text_dim] (fp32)."""
        return self.caption_decoder(self.text_encoder.encode(list(prompts)))

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], generators: Sequence[torch.Generator], steps: int | None = None,
                 callback: Callable[[int, float, Tensor], None] | None = None) -> list[Image.Image]:
        """One image per (prompt, generator), all denoised as one batch with the settings of `config.sample`
        (`steps` overrides its step count, e.g. for benchmarks)."""
        if len(prompts) != len(generators):
            raise ValueError(f"{len(prompts)} prompts but {len(generators)} generators")
        sample = self.config.sample
        z_init = torch.stack([torch.randn(tuple(self.config.z_shape), generator=g) for g in generators])
        clip_img_init = torch.stack([torch.randn(1, self.config.clip_img_dim, generator=g) for g in generators])

        def text_noise(text: Tensor) -> Tensor:
            noise = torch.stack([torch.randn(tuple(text.shape[1:]), generator=g) for g in generators])
            return noise.to(text)

        text = self.encode_text(prompts)
        with self.autocast():
            z, _ = t2i_sample(self.nnet, text, z_init.to(self.device), clip_img_init.to(self.device),
                              steps or sample.steps, sample.scale, sample.cfg_mode, self.config.data_type,
                              empty_text=self.empty_text, text_noise_fn=text_noise, callback=callback)
        return to_pil_images(self.autoencoder.decode(z.float(), slice_size=1))

    def generate_images(self, prompts: Sequence[str], seeds: Sequence[int], batch_size: int | None = None,
                        progress: bool = False) -> list[Image.Image]:
        """Image i from prompts[i] with noise from seeds[i] alone, in batches of `batch_size`."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        batch_size = batch_size or self.config.sample.batch_size
        images: list[Image.Image] = []
        for start in tqdm(range(0, len(prompts), batch_size), desc="images", unit="batch", disable=not progress):
            chunk = slice(start, start + batch_size)
            images += self.generate(prompts[chunk], [sample_generator(s) for s in seeds[chunk]])
        return images


def load_pipeline(config, device: str | torch.device, restore_path: str | Path | None = None,
                  count_parameters: bool = False) -> T2IPipeline:
    """Load every model once (fp32, on the CPU), apply the personalization in `restore_path`, count the
    changed parameters (spec §7) if asked, then merge the adapters and move/cast for speed."""
    ensure_weights(config, SAMPLING_WEIGHTS)
    device = torch.device(device)
    nnet = load_uvit(config, "cpu")
    text_encoder = load_text_encoder(config, "cpu")
    autoencoder = load_autoencoder(config, "cpu")
    caption_decoder = load_caption_decoder(config, "cpu")
    personalization = load_personalization(restore_path, nnet, text_encoder) if restore_path is not None else None
    finetuned = count_finetuned_parameters(config, nnet, autoencoder, text_encoder) if count_parameters else None

    nnet.to(device)
    merge_lora(nnet)
    merge_lora(text_encoder.transformer)
    nnet.to(dtype=inference_dtype(device)).eval()
    text_encoder.to(device).eval()
    autoencoder.to(device).eval()
    caption_decoder.to(device).eval()
    with torch.no_grad():
        empty_text = caption_decoder(text_encoder.encode([""]))[0]
    return T2IPipeline(config, nnet, autoencoder, text_encoder, caption_decoder, device, personalization,
                       finetuned, empty_text)


def generate_images(config, prompts: list[str], seeds: list[int], device: str | torch.device,
                    batch_size: int | None = None, progress: bool = False) -> list[Image.Image]:
    """Base-model images (no personalization), one per (prompt, seed): e.g. class images for prior preservation."""
    return load_pipeline(config, device).generate_images(prompts, seeds, batch_size, progress)


# --- prompts and output files ----------------------------------------------------------------------


def load_prompts(path: str | Path) -> list[str]:
    """The competition's prompt file (libs.prompts), problems raised as SamplingInputError."""
    return read_prompt_file(path, SamplingInputError)


def rewrite_prompt(prompt: str, token: str | None, class_words: Sequence[str] = DEFAULT_CLASS_WORDS) -> str:
    """"a boy in the wild" -> "a <new1> boy in the wild": the trained token goes before each whole class word."""
    if not token or not class_words:
        return prompt
    words = "|".join(re.escape(w) for w in class_words)
    return re.sub(rf"(?<!{re.escape(token)} )\b({words})\b", rf"{token} \1", prompt, flags=re.IGNORECASE)


def check_output_path(path: str | Path) -> Path:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SamplingInputError(f"output path {path} is a file, not a folder")
    return path


def save_jpeg(image: Image.Image, path: Path) -> None:
    """Atomic write: an interrupted run never leaves a truncated JPEG that --skip_existing would trust."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="JPEG", quality=JPEG_QUALITY)


def save_grid(output_path: Path, num_prompts: int, n_samples: int, cell: int = GRID_CELL) -> Path:
    """`grid.jpg`: one row per prompt (labelled with its index), one column per sample."""
    label = 48
    grid = Image.new("RGB", (label + n_samples * cell, num_prompts * cell), "white")
    draw = ImageDraw.Draw(grid)
    for row in range(num_prompts):
        draw.text((6, row * cell + cell // 2 - 6), str(row), fill="black")
        for column in range(n_samples):
            path = output_path / image_name(row, column)
            if path.is_file():
                with Image.open(path) as image:
                    grid.paste(image.convert("RGB").resize((cell, cell), Image.BICUBIC), (label + column * cell, row * cell))
    save_jpeg(grid, output_path / GRID_FILE)
    return output_path / GRID_FILE


def missing_samples(num_prompts: int, output_path: Path, n_samples: int, skip_existing: bool) -> list[tuple[int, list[int]]]:
    """(prompt index, sample indices to make) for every prompt with work left; all of them without skip_existing."""
    todo = []
    for index in range(num_prompts):
        missing = [i for i in range(n_samples) if not (skip_existing and (output_path / image_name(index, i)).is_file())]
        if missing:
            todo.append((index, missing))
    return todo


def peak_memory() -> str:
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU (allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process RSS)"


def sample_prompts(pipeline: T2IPipeline, prompts: Sequence[str], output_path: Path, n_samples: int, seed: int,
                   skip_existing: bool = False, rewrite: bool = True) -> int:
    """Write `{prompt_index}-{idx:03}.jpg` for every prompt; returns the number of images made.

    Prompts are rewritten with the trained token before encoding; names and seeds use the original index.
    """
    personalization = pipeline.personalization
    token = personalization.modifier_token if personalization and rewrite else None
    class_words = [personalization.class_word] if personalization and personalization.class_word else DEFAULT_CLASS_WORDS
    batch_size = pipeline.config.sample.batch_size
    todo = missing_samples(len(prompts), output_path, n_samples, skip_existing)
    if len(todo) < len(prompts):
        print(f"skipping {len(prompts) - len(todo)} prompt(s) whose {n_samples} images already exist")
    if not todo:
        print("nothing to sample")
        return 0

    batches = sum(math.ceil(len(missing) / batch_size) for _, missing in todo)
    made = 0
    with tqdm(total=batches * pipeline.config.sample.steps, desc="sampling", unit="step") as bar:
        for index, missing in todo:
            started = time.perf_counter()
            prompt = rewrite_prompt(prompts[index], token, class_words)
            bar.set_postfix_str(f"prompt {index}")
            for first in range(0, len(missing), batch_size):
                sample_indices = missing[first:first + batch_size]
                start_count = bar.n

                def advance(nfe: int, _t: float, _x: Tensor, start_count: int = start_count) -> None:
                    bar.update(start_count + nfe - bar.n)

                generators = [sample_generator(seed, index, i) for i in sample_indices]
                images = pipeline.generate([prompt] * len(sample_indices), generators, callback=advance)
                for i, image in zip(sample_indices, images):
                    save_jpeg(image, output_path / image_name(index, i))
                made += len(images)
            bar.write(f"prompt {index}: {time.perf_counter() - started:.1f}s  {prompt!r}")
    save_grid(output_path, len(prompts), n_samples)
    print(f"peak memory: {peak_memory()}")
    return made
