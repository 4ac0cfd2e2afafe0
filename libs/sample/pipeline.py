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

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import ml_collections
import torch
from einops import rearrange
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from libs.config import KEY_CHOICES, latent_shape
from libs.diffusion import N_TRAIN_STEPS, keyed_generator
from libs.download import SAMPLING_WEIGHTS, ensure_weights
from libs.dpm_solver import dpm_solver_sample
from libs.adapters.lora import merge_lora
from libs.models.autoencoder import AutoencoderKL
from libs.models.caption_decoder import CaptionDecoderPrefix
from libs.models.clip import CLIPTextEncoder
from libs.models.loading import load_autoencoder, load_caption_decoder, load_text_encoder, load_uvit
from libs.adapters.param_count import count_in_background
from libs.errors import UserError
from libs.personalization import Personalization, base_model, load_personalization
from libs.precision import autocast, inference_dtype

CFG_MODES = KEY_CHOICES["sample.cfg_mode"]

TextNoiseFn = Callable[[Tensor], Tensor]
"""`text_noise_fn(text) -> noise shaped like text`: the `true_uncond` text of one model call."""


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
        return autocast(self.device, self.dtype)

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """Prompts -> the U-ViT's low-dimensional text tokens [B, 77, text_dim] (fp32)."""
        return self.caption_decoder(self.text_encoder.encode(list(prompts)))

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], generators: Sequence[torch.Generator], steps: int | None = None,
                 callback: Callable[[int, float, Tensor], None] | None = None) -> list[Image.Image]:
        """One image per (prompt, generator), all denoised as one batch with the settings of `config.sample`
        (`steps` overrides its step count, e.g. for benchmarks)."""
        return self.decode(self.denoise(prompts, generators, steps, callback))

    @torch.no_grad()
    def decode(self, z: Tensor) -> list[Image.Image]:
        """Final latents -> images (apart from `denoise` so benchmarks can time the two)."""
        return to_pil_images(self.autoencoder.decode(z.float(), slice_size=1))

    @torch.no_grad()
    def denoise(self, prompts: Sequence[str], generators: Sequence[torch.Generator], steps: int | None = None,
                callback: Callable[[int, float, Tensor], None] | None = None) -> Tensor:
        """The final latents [B, C, H, W] of `generate`'s images, before decoding."""
        if len(prompts) != len(generators):
            raise ValueError(f"{len(prompts)} prompts but {len(generators)} generators")
        sample = self.config.sample
        z_init = torch.stack([torch.randn(latent_shape(self.config), generator=g) for g in generators])
        clip_img_init = torch.stack([torch.randn(1, self.config.clip_img_dim, generator=g) for g in generators])

        def text_noise(text: Tensor) -> Tensor:
            noise = torch.stack([torch.randn(tuple(text.shape[1:]), generator=g) for g in generators])
            return noise.to(text)

        text = self.encode_text(prompts)
        with self.autocast():
            z, _ = t2i_sample(self.nnet, text, z_init.to(self.device), clip_img_init.to(self.device),
                              steps or sample.steps, sample.scale, sample.cfg_mode, self.config.data_type,
                              empty_text=self.empty_text, text_noise_fn=text_noise, callback=callback)
        return z

    def generate_images(self, prompts: Sequence[str], seeds: Sequence[int], batch_size: int | None = None,
                        progress: bool = False) -> list[Image.Image]:
        """Image i from prompts[i] with noise from seeds[i] alone, in batches of `batch_size`."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        batch_size = batch_size or self.config.sample.batch_size
        images: list[Image.Image] = []
        for start in tqdm(range(0, len(prompts), batch_size), desc="images", unit="batch", disable=not progress):
            chunk = slice(start, start + batch_size)
            images += self.generate(prompts[chunk], [keyed_generator(s) for s in seeds[chunk]])
        return images


def weight_sharing_copy(module: nn.Module) -> nn.Module:
    """A structural copy of `module` whose parameters are new objects over the same storage.

    Adapters injected into the copy, tokens added to it and safe merges (which make new tensors) change the
    copy only: the original stays exactly the base model, so personalizations can follow each other in one
    process without reloading 952 M parameters and without one leaking into the next."""
    memo = {id(p): nn.Parameter(p.data, requires_grad=False) for p in module.parameters()}
    return copy.deepcopy(module, memo)


@dataclass
class BaseModels:
    """The models every personalization starts from, loaded once per process (CPU, fp32; the U-ViT's
    weights memory-mapped from its file); VAE and caption prefix already on the device."""

    config: ml_collections.ConfigDict
    device: torch.device
    nnet: nn.Module
    text_encoder: CLIPTextEncoder
    autoencoder: AutoencoderKL
    caption_decoder: CaptionDecoderPrefix


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device that exists here; `cuda` on a machine without CUDA is a user error, not a traceback."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise UserError(f"unknown device {str(device)!r}: use cpu, cuda or cuda:N") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: this machine has no usable CUDA GPU; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def load_base(config: ml_collections.ConfigDict, device: str | torch.device) -> BaseModels:
    """Check for every weight file first, then load the base models once."""
    device = resolve_device(device)
    ensure_weights(config, SAMPLING_WEIGHTS)
    return BaseModels(config, device, load_uvit(config, "cpu"), load_text_encoder(config, "cpu"),
                      load_autoencoder(config, device), load_caption_decoder(config, device))


def personalize(base: BaseModels, restore_path: str | Path | None, count_parameters: bool = False) -> T2IPipeline:
    """The base models with the personalization in `restore_path` (None: the plain base model on purpose):
    applied to weight-sharing copies, counted (spec §7) if asked on the parameters as loaded (adapters still
    their own parameters; the count runs in a thread while the copies are merged and moved/cast for speed).
    The base models are left exactly as they were."""
    nnet = weight_sharing_copy(base.nnet)
    text_encoder = weight_sharing_copy(base.text_encoder)
    personalization = (load_personalization(restore_path, nnet, text_encoder) if restore_path is not None
                       else base_model())
    # the count reads the parameters as they are now, in a thread, while they are merged and moved
    counting = count_in_background(base.config, nnet, base.autoencoder, text_encoder) if count_parameters else None
    source = str(restore_path)
    merge_lora(nnet, source, base.device, inference_dtype(base.device))  # layer by layer: no fp32 copy on the GPU
    nnet.eval()
    merge_lora(text_encoder.transformer, source)
    text_encoder.to(base.device).eval()
    finetuned = counting.result() if counting is not None else None
    with torch.no_grad():
        empty_text = base.caption_decoder(text_encoder.encode([""]))[0]
    return T2IPipeline(base.config, nnet, base.autoencoder, text_encoder, base.caption_decoder, base.device,
                       personalization, finetuned, empty_text)


def load_pipeline(config: ml_collections.ConfigDict, device: str | torch.device, restore_path: str | Path | None = None,
                  count_parameters: bool = False) -> T2IPipeline:
    """Base models and one personalization (`restore_path`; None = the plain base model), ready to sample."""
    return personalize(load_base(config, device), restore_path, count_parameters)


def generate_images(config: ml_collections.ConfigDict, prompts: list[str], seeds: list[int], device: str | torch.device,
                    batch_size: int | None = None, progress: bool = False) -> list[Image.Image]:
    """Base-model images (no personalization), one per (prompt, seed): e.g. class images for prior preservation."""
    return load_pipeline(config, device).generate_images(prompts, seeds, batch_size, progress)
