"""Spec §7: how many parameters the personalization changed, counted the competition's way."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import ml_collections
import torch
from torch import nn

from libs.checkpoint import load_torch_state_dict
from libs.models.clip import CLIPTextEncoder
from libs.models.loading import original_autoencoder_state, original_text_encoder_state


def _canonical(name: str) -> str:
    """peft renames a wrapped weight `x.weight` -> `x.base_layer.weight`; compare it under its original name."""
    return name.replace(".base_layer.", ".")


def count_changed_parameters(current: Iterable[tuple[str, torch.Tensor]], original: Mapping[str, torch.Tensor]) -> int:
    """Spec §7 for one model: same name+shape but other values -> numel; same name, other shape -> both
    numels; a name on one side only -> its numel. `current` are the named parameters of the model as
    loaded for sampling (adapters unmerged), `original` a fresh copy's state dict."""
    seen = set()
    changed = 0
    for name, tensor in current:
        name = _canonical(name)
        seen.add(name)
        if name not in original:
            changed += tensor.numel()
            continue
        reference = original[name]
        if tuple(reference.shape) != tuple(tensor.shape):
            changed += tensor.numel() + reference.numel()
        elif not torch.equal(tensor.detach().to("cpu", reference.dtype), reference):
            changed += tensor.numel()
    changed += sum(t.numel() for n, t in original.items() if n not in seen)
    return changed


def count_finetuned_parameters(config: ml_collections.ConfigDict, nnet: nn.Module, autoencoder: nn.Module, text_encoder: CLIPTextEncoder) -> int:
    """Spec §7 summed over U-ViT, VAE and CLIP text encoder, each against a fresh original from its file.

    Call it after the personalization is loaded and before adapters are merged or weights cast.
    """
    nnet_file = Path(config.paths.nnet)
    total = count_changed_parameters(nnet.named_parameters(), load_torch_state_dict(nnet_file, "U-ViT checkpoint"))
    total += count_changed_parameters(autoencoder.named_parameters(), original_autoencoder_state(config))
    total += count_changed_parameters(text_encoder.transformer.named_parameters(), original_text_encoder_state(config))
    return total
