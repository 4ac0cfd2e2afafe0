"""Every model built from its files, in one place: the U-ViT, the VAE and the caption-decoder prefix from
the official pickles (strict, `weights_only`, memory-mapped, built on the `meta` device so 952 M
parameters are never randomly initialised first), the CLIP towers from Hugging Face folders.

Paths come from the config, already absolute (libs/config.py); hub ids are used only when the local
folder is absent and the config names one.
"""
from __future__ import annotations

import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import ml_collections
import torch
from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection
from transformers.utils import logging as hf_logging

from libs.checkpoint import DOWNLOAD_HINT, CheckpointError, load_strict, load_torch_state_dict
from libs.config import EXTRA_MODELS_ENV, hub_offline
from libs.download import resolve_pretrained
from libs.models.autoencoder import AutoencoderKL
from libs.models.caption_decoder import CaptionDecoderPrefix
from libs.models.clip import CLIPImageEncoder, CLIPTextEncoder
from libs.models.uvit import UViT

CAPTION_DECODER_PREFIX = "module."  # the official caption_decoder.pth was saved from a DataParallel wrapper
CAPTION_PREFIX_LAYERS = ("encode_prefix", "decode_prefix")


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Loading one tower from a full CLIPModel folder is intended: hide transformers' unused-key report
    and its per-load progress bars."""
    previous = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()


def _frozen(module: torch.nn.Module, device: str | torch.device, dtype: torch.dtype | None = None) -> torch.nn.Module:
    module = module.to(device=device, dtype=dtype) if dtype is not None else module.to(device)
    return module.eval().requires_grad_(False)


# --- the U-ViT ----------------------------------------------------------------------------------


def build_uvit(config: ml_collections.ConfigDict, device: str | torch.device = "cpu") -> UViT:
    """A U-ViT with the architecture in `config.nnet` (uninitialized when on meta)."""
    with torch.device(device):
        return UViT(**config.nnet)


def load_uvit(config: ml_collections.ConfigDict, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32, path: str | None = None) -> UViT:
    """The base U-ViT from `config.paths.nnet` (or `path`), loaded strictly, frozen and in eval mode."""
    source = Path(path or config.paths.nnet)
    state = load_torch_state_dict(source, "U-ViT checkpoint (uvit_v1.pth)")
    model = build_uvit(config, "meta")
    load_strict(model, state, source)
    return _frozen(model, device, dtype)


# --- the autoencoder ----------------------------------------------------------------------------


def load_autoencoder(config: ml_collections.ConfigDict, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """`config.autoencoder` strictly loaded from `config.paths.autoencoder`, frozen for inference."""
    with torch.device("meta"):
        model = AutoencoderKL(**config.autoencoder.to_dict())
    path = Path(config.paths.autoencoder)
    load_strict(model, load_torch_state_dict(path, "autoencoder checkpoint"), path)
    return _frozen(model, device, dtype)


# --- the caption decoder's prefix ----------------------------------------------------------------


def prefix_state_dict(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Pick the prefix layers out of a full caption-decoder checkpoint (`module.` prefix, GPT-2 weights,
    legacy `attn.bias`/`attn.masked_bias` buffers and `clip*` extras are all tolerated and skipped)."""
    wanted = {f"{layer}.{p}" for layer in CAPTION_PREFIX_LAYERS for p in ("weight", "bias")}
    picked = {}
    for key, value in state.items():
        name = key.removeprefix(CAPTION_DECODER_PREFIX)
        if name in wanted:
            picked[name] = value
    missing = sorted(wanted - set(picked))
    if missing:
        raise CheckpointError(f"{source} is not a UniDiffuser caption decoder: missing "
                              f"{', '.join(CAPTION_DECODER_PREFIX + m for m in missing)}")
    return picked


def load_caption_decoder(config: ml_collections.ConfigDict, device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32) -> CaptionDecoderPrefix:
    """Prefix layers from `config.paths.caption_decoder`, frozen, in eval mode."""
    source = Path(config.paths.caption_decoder)
    state = prefix_state_dict(load_torch_state_dict(source, "caption decoder (caption_decoder.pth)"), str(source))
    model = CaptionDecoderPrefix(**config.caption_decoder)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        raise CheckpointError(f"{source}: prefix layer shapes {found} do not match the config {expected}")
    model.load_state_dict(state, strict=True)
    return _frozen(model, device, dtype)


# --- CLIP ---------------------------------------------------------------------------------------


def text_encoder_source(config: ml_collections.ConfigDict) -> str:
    return resolve_pretrained(config.paths.clip_text, config.paths.clip_text_hub, "CLIP text encoder")


def image_encoder_source(config: ml_collections.ConfigDict) -> str:
    return resolve_pretrained(config.paths.clip_img, config.paths.clip_img_hub, "CLIP image encoder")


def _from_pretrained(cls, source: str, what: str):
    try:
        with quiet_transformers():
            return cls.from_pretrained(source)
    except (OSError, ValueError, pickle.UnpicklingError) as error:  # a refused pickle is a bad file, not a bug
        offline = (f" (hub access is off: HF_HUB_OFFLINE=1; put the model folder into models/ or "
                   f"${EXTRA_MODELS_ENV})" if hub_offline() and not Path(source).is_dir() else "")
        raise CheckpointError(f"cannot load the {what} from {source!r}{offline}: {str(error).splitlines()[0]}\n"
                              f"  -> {DOWNLOAD_HINT}") from error


def load_text_encoder(config: ml_collections.ConfigDict, device: str | torch.device = "cpu") -> CLIPTextEncoder:
    """The frozen CLIP text encoder named by `config.paths.clip_text` (local folder or hub id)."""
    source = text_encoder_source(config)
    encoder = CLIPTextEncoder(_from_pretrained(CLIPTokenizer, source, "CLIP tokenizer"),
                              _from_pretrained(CLIPTextModel, source, "CLIP text encoder"))
    return _frozen(encoder, device)


def original_text_encoder_state(config: ml_collections.ConfigDict) -> dict[str, torch.Tensor]:
    """A fresh copy of the text encoder's weights: the reference for the changed-parameter count."""
    return _from_pretrained(CLIPTextModel, text_encoder_source(config), "CLIP text encoder").state_dict()


def load_image_encoder(config: ml_collections.ConfigDict, device: str | torch.device = "cpu") -> CLIPImageEncoder:
    """The frozen CLIP image encoder named by `config.paths.clip_img` (local folder or hub id)."""
    model = _from_pretrained(CLIPVisionModelWithProjection, image_encoder_source(config), "CLIP image encoder")
    return _frozen(CLIPImageEncoder(model), device)
