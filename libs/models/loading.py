"""Every model built from its files, in one place: the U-ViT, the VAE and the caption-decoder prefix from
the official pickles (strict, `weights_only`, memory-mapped, built on the `meta` device so 952 M
parameters are never randomly initialised first), the CLIP towers from Hugging Face folders.

The VAE file is in the LDM layout and the network is diffusers': diffusers' own conversion reads it
(checked to use every key), `autoencoder_ldm_state` writes a model back in that layout. diffusers is
imported only when a VAE is built (~1.2 s: its autoencoder package imports every autoencoder and UNet
block), so programs that never build one (score.py, the tools) do not pay for it.

The originals the changed-parameter count compares with (spec §7) are read from their files tensor by
tensor (`original_*_state`), never as a second model in memory.

Paths come from the config, already absolute (libs/config.py); hub ids are used only when the local
folder is absent and the config names one.
"""
from __future__ import annotations

import pickle
import re
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping

import ml_collections
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection
from transformers.utils import logging as hf_logging

from libs.files import (DOWNLOAD_HINT, CheckpointError, LazySafetensors, key_mismatches, load_strict,
                             load_torch_state_dict, safetensors_files)
from libs.config import EXTRA_MODELS_ENV, hub_offline
from libs.download import resolve_pretrained
from libs.models.caption_decoder import CaptionDecoderPrefix
from libs.models.clip import CLIPImageEncoder, CLIPTextEncoder
from libs.models.uvit import UViT

if TYPE_CHECKING:
    from libs.models.autoencoder import AutoencoderKL

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


def build_autoencoder(config: ml_collections.ConfigDict, device: str | torch.device = "cpu") -> AutoencoderKL:
    """A VAE with the architecture in `config.autoencoder` (uninitialized when on meta)."""
    from libs.models.autoencoder import AutoencoderKL

    with torch.device(device):
        return AutoencoderKL(**config.autoencoder.to_dict())


# diffusers' names inside a mid-block attention -> LDM's (the inverse of update_vae_attentions_ldm_to_diffusers)
_LDM_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


# the module order of LDM's AutoencoderKL (its state_dict order; levels in index order inside `down`/`up`)
_LDM_ORDER = ("encoder.conv_in", "encoder.down", "encoder.mid.block_1", "encoder.mid.attn_1", "encoder.mid.block_2",
              "encoder.norm_out", "encoder.conv_out", "decoder.conv_in", "decoder.mid.block_1", "decoder.mid.attn_1",
              "decoder.mid.block_2", "decoder.up", "decoder.norm_out", "decoder.conv_out", "quant_conv",
              "post_quant_conv")


def _ldm_key(name: str, levels: int) -> str:
    """One diffusers VAE parameter name -> its name in the official LDM file (the inverse of
    diffusers' `convert_ldm_vae_checkpoint`). Decoder levels count the other way round in LDM."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    if name in DIFFUSERS_TO_LDM_MAPPING["vae"]:
        return DIFFUSERS_TO_LDM_MAPPING["vae"][name]
    name = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", name)
    name = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name)
    name = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.",
                  lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", name)
    name = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                  lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", name)
    name = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", name)
    name = re.sub(r"\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$",
                  lambda m: f".mid.attn_1.{_LDM_ATTENTION.get(m[1], m[1])}.{m[2]}", name)
    return name.replace(".conv_shortcut.", ".nin_shortcut.")


def autoencoder_ldm_state(model: AutoencoderKL) -> dict[str, torch.Tensor]:
    """The model's weights in the official `autoencoder_kl.pth` layout: LDM names and order, the mid-block
    attention projections as 1x1 convolutions. What the tiny world and the benches write; `load_autoencoder`
    reads it back exactly."""
    levels = len(model.vae.config.block_out_channels)
    items = []
    for name, tensor in model.vae.state_dict().items():
        key = _ldm_key(name, levels)
        if ".mid.attn_1." in key and tensor.ndim == 2:  # diffusers' Linear -> LDM's Conv2d(kernel_size=1)
            tensor = tensor[:, :, None, None]
        items.append((key, tensor))
    # stable sort into LDM's module order; within a module diffusers registers the tensors in LDM's order
    return dict(sorted(items, key=lambda item: _ldm_rank(item[0])))


def _ldm_rank(key: str) -> tuple[int, int]:
    group = next((i for i, prefix in enumerate(_LDM_ORDER) if key.startswith(prefix + ".")), len(_LDM_ORDER))
    level = re.match(r"(?:encoder\.down|decoder\.up)\.(\d+)\.", key)
    return group, int(level[1]) if level else 0


def convert_ldm_vae_checkpoint(state: dict[str, torch.Tensor], vae_config: Mapping) -> dict[str, torch.Tensor]:
    """diffusers' own LDM -> diffusers VAE conversion (imported on first use)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint as convert

    return convert(state, vae_config)


def autoencoder_state_from_ldm(model: AutoencoderKL, state: Mapping[str, torch.Tensor],
                               source: str | Path) -> dict[str, torch.Tensor]:
    """An LDM-layout state (the official file's) in the names of `model.vae`, by diffusers' own conversion.

    Strict: the file must hold exactly the LDM keys and shapes of this architecture, and every one of its
    tensors must come out of the conversion (which silently skips keys it does not know)."""
    problems = key_mismatches(autoencoder_ldm_state(model), state)
    if problems:
        raise CheckpointError("\n".join([f"{source} is not an LDM KL autoencoder of this config "
                                         "(is it the right file / config?)", *problems]))
    converted = {k: v for k, v in convert_ldm_vae_checkpoint(dict(state), model.vae.config).items() if v is not None}
    used = {id(_root(tensor)) for tensor in converted.values()}
    unused = sorted(key for key, tensor in state.items() if id(_root(tensor)) not in used)
    problems = key_mismatches(model.vae.state_dict(), converted)
    if unused or problems or len(converted) != len(state):
        lines = [f"  file keys the conversion did not use: {', '.join(unused)}"] if unused else []
        raise CheckpointError("\n".join([f"{source}: diffusers' LDM conversion does not map the file onto "
                                         "the model one to one (a diffusers version this code does not know?)",
                                         *lines, *problems]))
    return converted


def _root(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor a view was taken from (the conversion slices the attention weights)."""
    return tensor if tensor._base is None else tensor._base


def _autoencoder_file(config: ml_collections.ConfigDict) -> tuple[AutoencoderKL, dict[str, torch.Tensor], Path]:
    """A meta-device VAE of `config.autoencoder` and the file's weights (memory-mapped) in its names."""
    path = Path(config.paths.autoencoder)
    model = build_autoencoder(config, "meta")
    return model, autoencoder_state_from_ldm(model, load_torch_state_dict(path, "autoencoder checkpoint"), path), path


def load_autoencoder(config: ml_collections.ConfigDict, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """`config.autoencoder` strictly loaded from the LDM-layout `config.paths.autoencoder`, frozen for inference."""
    model, state, path = _autoencoder_file(config)
    load_strict(model.vae, state, path)
    return _frozen(model, device, dtype)


def original_autoencoder_state(config: ml_collections.ConfigDict) -> dict[str, torch.Tensor]:
    """The VAE's weights as in its file, under the sampling model's parameter names: the reference for the
    changed-parameter count (spec §7). Memory-mapped and converted by name (the model stays on meta)."""
    _, state, _ = _autoencoder_file(config)
    return {f"vae.{name}": tensor for name, tensor in state.items()}


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


def original_text_encoder_state(config: ml_collections.ConfigDict) -> Mapping[str, torch.Tensor]:
    """The text encoder's weights as in its folder: the reference for the changed-parameter count.

    From a local safetensors folder each tensor is read only when compared (`LazySafetensors`), under the
    names of a `CLIPTextModel` (a full CLIPModel folder stores them under `text_model.`, as transformers
    maps them). A hub id, a `.bin` folder, or a folder that does not hold every parameter falls back to
    loading the model the way `load_text_encoder` does, so the reference is the same either way."""
    source = text_encoder_source(config)
    lazy = _lazy_text_encoder_state(Path(source)) if Path(source).is_dir() else None
    if lazy is not None:
        return lazy
    return _from_pretrained(CLIPTextModel, source, "CLIP text encoder").state_dict()


def _lazy_text_encoder_state(folder: Path) -> LazySafetensors | None:
    """The folder's tensors under CLIPTextModel's names, or None where from_pretrained could give other
    values than the file holds (a missing or reshaped tensor, a dtype other than the config's)."""
    files = safetensors_files(folder)
    if not files:
        return None
    with quiet_transformers():
        text_config = CLIPTextConfig.from_pretrained(str(folder))
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in CLIPTextModel(text_config).state_dict().items()}
    dtype = text_config.dtype or torch.float32  # a CLIPModel folder's text config names none: fp32 only
    stored = LazySafetensors(files)
    names = {}
    for name in shapes:
        key = name if name in stored else f"text_model.{name}"
        if key not in stored or stored.shape(key) != shapes[name] or stored.dtype(key) != dtype:
            return None
        names[name] = key
    return LazySafetensors(files, names)


def load_image_encoder(config: ml_collections.ConfigDict, device: str | torch.device = "cpu") -> CLIPImageEncoder:
    """The frozen CLIP image encoder named by `config.paths.clip_img` (local folder or hub id)."""
    model = _from_pretrained(CLIPVisionModelWithProjection, image_encoder_source(config), "CLIP image encoder")
    return _frozen(CLIPImageEncoder(model), device)
