"""Training data as the steps use it: every view (image x flip) of the instance and class images
encoded once by the frozen VAE encoder and CLIP image tower (in memory, optionally on disk), with its
person mask on the latent grid when the image has one (the masked loss), and the prompts' token ids, or
their encodings when the text path does not train.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import ml_collections
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from libs.files import CheckpointError, cached_sha256, file_sha256, load_safetensors, save_safetensors
from libs.config import LATENT_FACTOR
from libs.models.clip import CLIPTextEncoder, clip_image_preprocess
from libs.models.loading import image_encoder_source, load_image_encoder
from libs.train.images import TrainImage
from libs.train.model import JointNoisePredictor, Models
from libs.train.plan import Plan

CACHE_VERSION = 1  # bump when the encoding below changes, so old disk-cache entries are not reused


def vae_pixels(images: Sequence[Image.Image]) -> Tensor:
    """RGB images -> [B, 3, H, W] float32 in [-1, 1], the autoencoder's input range."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


class ImageEncoder:
    """The frozen VAE encoder and CLIP image tower: images -> (posterior moments, CLIP image embeddings)."""

    def __init__(self, autoencoder: torch.nn.Module, clip_image: torch.nn.Module, device: torch.device | str):
        self.autoencoder = autoencoder
        self.clip_image = clip_image
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> tuple[Tensor, Tensor]:
        dtype = next(self.autoencoder.parameters()).dtype
        moments = self.autoencoder.encode_moments(vae_pixels(images).to(self.device, dtype))
        clip = self.clip_image(clip_image_preprocess(images, self.clip_image.image_size))
        return moments.float().cpu(), clip.float().cpu()


def latent_mask(mask: Image.Image) -> Tensor:
    """A person mask (L, 255 = person) -> [1, H/8, W/8] float32 in [0, 1]: the share of person pixels in
    each latent cell (an 8x8 area mean)."""
    pixels = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]
    return F.avg_pool2d(pixels, LATENT_FACTOR)[0]


class LatentSource:
    """Moments and CLIP embeddings of every view (image x flip) of an image list, kept on the CPU (a step
    draws its posterior samples there from seeded generators, then moves one small batch to the device),
    and the views' person masks on the latent grid when any image has one.

    With `cached` they are encoded once, in chunks (and read from / written to `cache_dir` when given,
    keyed by the prepared pixels, the mask's pixels, and `cache_key`, which should name the encoders);
    otherwise the views a step asks for are encoded on the spot, exactly as the cache would hold them.
    """

    def __init__(self, images: Sequence[TrainImage], hflip: bool, encoder: ImageEncoder, cached: bool = True,
                 batch_size: int = 8, cache_dir: str | Path | None = None, cache_key: str = ""):
        self.images = list(images)
        self.num_flips = 2 if hflip else 1
        self.encoder: ImageEncoder | None = encoder
        self.moments: Tensor | None = None
        self.clip: Tensor | None = None
        self.masks: Tensor | None = None  # [views, 1, h, w] when cached and any image has a mask
        self.has_masks = any(image.mask is not None for image in self.images)
        if cached:
            self._encode_all(batch_size, Path(cache_dir) if cache_dir else None, cache_key)
            self.encoder = None  # the towers can be freed: every view is in the cache

    def __len__(self) -> int:
        return len(self.images) * self.num_flips

    def view(self, index: int) -> Image.Image:
        image, flip = divmod(index, self.num_flips)
        return self.images[image].views(self.num_flips == 2)[flip]

    def view_mask(self, index: int) -> Image.Image | None:
        image, flip = divmod(index, self.num_flips)
        masks = self.images[image].mask_views(self.num_flips == 2)
        return masks[flip] if masks else None

    def lookup(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Moments [B, 2C, h, w] and CLIP image embeddings [B, D] of these views (float32, CPU)."""
        if self.moments is not None:
            return self.moments[indices], self.clip[indices]
        return self.encoder([self.view(int(i)) for i in indices])

    def mask_lookup(self, indices: Tensor) -> Tensor:
        """Person masks [B, 1, h, w] of these views on the latent grid; ones for a view without a mask."""
        if self.masks is not None:
            return self.masks[indices]
        return torch.stack([self._latent_mask(int(i)) for i in indices])

    def _latent_mask(self, index: int) -> Tensor:
        mask = self.view_mask(index)
        if mask is not None:
            return latent_mask(mask)
        side = self.images[index // self.num_flips].image.size[0] // LATENT_FACTOR
        return torch.ones(1, side, side)

    def _encode_all(self, batch_size: int, cache_dir: Path | None, cache_key: str) -> None:
        moments: list[Tensor | None] = [None] * len(self)
        clip: list[Tensor | None] = [None] * len(self)
        masks: list[Tensor | None] = [None] * len(self)
        keys = [self._key(i, cache_key) for i in range(len(self))] if cache_dir else []
        if cache_dir:
            for i, key in enumerate(keys):
                entry = cache_dir / f"{key}.safetensors"
                if entry.is_file():
                    try:
                        stored = load_safetensors(entry, "latent cache entry")
                    except CheckpointError:
                        continue  # a damaged entry is simply encoded again
                    if self.view_mask(i) is not None and "mask" not in stored:
                        continue
                    moments[i], clip[i], masks[i] = stored["moments"], stored["clip"], stored.get("mask")
        todo = [i for i in range(len(self)) if moments[i] is None]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            chunk_moments, chunk_clip = self.encoder([self.view(i) for i in chunk])
            for j, i in enumerate(chunk):
                moments[i], clip[i] = chunk_moments[j], chunk_clip[j]
                entry = {"moments": moments[i], "clip": clip[i]}
                if self.view_mask(i) is not None:
                    masks[i] = entry["mask"] = latent_mask(self.view_mask(i))
                if cache_dir:
                    save_safetensors(entry, cache_dir / f"{keys[i]}.safetensors")
        self.moments = torch.stack(moments)
        self.clip = torch.stack(clip)
        if self.has_masks:
            self.masks = torch.stack([m if m is not None else self._latent_mask(i) for i, m in enumerate(masks)])

    def _key(self, index: int, cache_key: str) -> str:
        """The disk cache key of a view: its pixels, its mask's pixels (when it has one) and the encoders."""
        digest = hashlib.sha256(f"v{CACHE_VERSION}|{cache_key}|".encode())
        digest.update(self.view(index).tobytes())
        mask = self.view_mask(index)
        if mask is not None:
            digest.update(b"|mask|" + mask.tobytes())
        return digest.hexdigest()


def describe_sources(images: Sequence[TrainImage]) -> list[dict[str, str]]:
    """What train_config.json records about each image: file, its sha256, how it was framed."""
    return [{"file": str(image.path), "sha256": file_sha256(image.path), "crop": image.crop} for image in images]


@dataclass
class TrainData:
    """Cached image encodings and text inputs of the instance and class sets."""

    instance: LatentSource
    instance_ids: Tensor  # [1, 77] the instance prompt's token ids
    instance_encoded: Tensor | None  # [1, 77, text_dim] when the instance prompt is encoded once (frozen mode)
    classes: LatentSource | None = None
    class_ids: Tensor | None = None  # [M, 77], one per class image
    class_text: Tensor | None = None  # [M, 77, text_dim] when class prompts are encoded once
    warnings: list[str] = field(default_factory=list)

    def instance_text(self, count: int) -> tuple[Tensor | None, Tensor | None]:
        """(token ids to encode, encoded text) for `count` instance rows: one of the two is None."""
        if self.instance_encoded is not None:
            return None, self.instance_encoded.expand(count, -1, -1)
        return self.instance_ids.expand(count, -1), None


def encoder_fingerprint(config: ml_collections.ConfigDict) -> str:
    """Names the VAE and CLIP image weights, for the disk cache key (hashes are cached beside the files)."""
    clip = image_encoder_source(config)
    folder = Path(clip)
    clip_files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) if folder.is_dir() else []
    parts = [cached_sha256(config.paths.autoencoder)] + [cached_sha256(p) for p in clip_files]
    return "|".join(parts or [clip]) + ("" if clip_files else f"|{clip}")


def build_data(plan: Plan, instance: list[TrainImage], classes: list[TrainImage] | None, models: Models,
               device: torch.device, is_main: bool) -> TrainData:
    """Encode every view once (VAE moments, CLIP image embeddings) and the prompts that do not train."""
    config = plan.config
    cfg = config.train
    clip_image = load_image_encoder(config, device)
    encoder = ImageEncoder(models.autoencoder, clip_image, device)
    # the disk cache is the main process's: the others encode for themselves (seconds) and write nothing
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir and cfg.cache_latents and is_main else None
    cache = dict(cached=bool(cfg.cache_latents), batch_size=int(cfg.encode_batch_size), cache_dir=cache_dir,
                 cache_key=encoder_fingerprint(config) if cache_dir else "")
    model = models.model
    text_encoder = model.text_encoder
    mode = cfg.text_encoder_mode
    instance_ids = text_encoder.tokenize([plan.instance_prompt])
    data = TrainData(LatentSource(instance, bool(cfg.hflip), encoder, **cache), instance_ids,
                     _encode_once(model, instance_ids) if mode == "frozen" else None)
    if classes:
        prompts = [image.caption for image in classes]
        data.classes = LatentSource(classes, bool(cfg.hflip), encoder, **cache)
        data.class_ids = text_encoder.tokenize(prompts)
        text_trains = mode in ("lora", "full") or (plan.token is not None and any(plan.token in p for p in prompts))
        if not text_trains:
            data.class_text = _encode_once(model, data.class_ids)
    data.warnings += long_prompt_warnings(text_encoder, [plan.instance_prompt] + [c.caption for c in classes or []])
    return data


def long_prompt_warnings(text_encoder: CLIPTextEncoder, prompts: list[str]) -> list[str]:
    """One warning per distinct prompt longer than CLIP reads (77 tokens): the rest is cut, never seen."""
    warnings = []
    for prompt in dict.fromkeys(prompts):
        tokens = text_encoder.count_tokens(prompt)
        if tokens > text_encoder.max_length:
            warnings.append(f"the prompt {prompt!r} is {tokens} CLIP tokens; training reads the first "
                            f"{text_encoder.max_length} and cuts the rest")
    return warnings


def _encode_once(model: JointNoisePredictor, ids: Tensor, chunk: int = 64) -> Tensor:
    with torch.no_grad():
        device = next(model.caption_prefix.parameters()).device
        return torch.cat([model.encode_text(part.to(device)).float().cpu() for part in ids.split(chunk)])
