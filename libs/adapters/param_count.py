"""Spec §7: how many parameters the personalization changed, counted the competition's way."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Mapping

import ml_collections
import torch
from torch import nn

from libs.files import load_torch_state_dict
from libs.models.clip import CLIPTextEncoder
from libs.models.loading import original_autoencoder_state, original_text_encoder_state


def _canonical(name: str) -> str:
    """peft renames a wrapped weight `x.weight` -> `x.base_layer.weight`; compare it under its original name."""
    return name.replace(".base_layer.", ".")


def count_changed_parameters(current: Iterable[tuple[str, torch.Tensor]], original: Mapping[str, torch.Tensor]) -> int:
    """Spec §7 for one model: same name+shape but other values -> numel; same name, other shape -> both
    numels; a name on one side only -> its numel. `current` are the named parameters of the model as
    loaded for sampling (adapters unmerged), `original` the weights as in the file (a state dict, or a
    mapping that reads each tensor when asked: one tensor at a time is held)."""
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
    changed += sum(original[n].numel() for n in original if n not in seen)
    return changed


def count_finetuned_parameters(config: ml_collections.ConfigDict, nnet: nn.Module, autoencoder: nn.Module, text_encoder: CLIPTextEncoder) -> int:
    """Spec §7 summed over U-ViT, VAE and CLIP text encoder, each against its original read afresh from its
    file (memory-mapped, or tensor by tensor: never a second model in memory).

    Call it after the personalization is loaded and before adapters are merged or weights cast.
    """
    return _count(config, *_snapshots(nnet, autoencoder, text_encoder))


def count_in_background(config: ml_collections.ConfigDict, nnet: nn.Module, autoencoder: nn.Module,
                        text_encoder: CLIPTextEncoder) -> Future[int]:
    """`count_finetuned_parameters` of the parameters as they are now, computed in a thread.

    The parameters are taken (as tensors over their present storage) before this returns, so the caller
    may merge, move and cast the models at once: the comparisons (which release the GIL) overlap with that
    work instead of preceding it, and count exactly what the synchronous call would."""
    snapshots = _snapshots(nnet, autoencoder, text_encoder)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="param-count")
    try:
        return pool.submit(_count, config, *snapshots)
    finally:
        pool.shutdown(wait=False)


Snapshot = list[tuple[str, torch.Tensor]]


def _snapshots(nnet: nn.Module, autoencoder: nn.Module, text_encoder: CLIPTextEncoder) -> tuple[Snapshot, ...]:
    return tuple([(name, param.detach()) for name, param in module.named_parameters()]
                 for module in (nnet, autoencoder, text_encoder.transformer))


def _count(config: ml_collections.ConfigDict, nnet: Snapshot, autoencoder: Snapshot, text_encoder: Snapshot) -> int:
    nnet_file = Path(config.paths.nnet)
    total = count_changed_parameters(nnet, load_torch_state_dict(nnet_file, "U-ViT checkpoint"))
    total += count_changed_parameters(autoencoder, original_autoencoder_state(config))
    total += count_changed_parameters(text_encoder, original_text_encoder_state(config))
    return total
