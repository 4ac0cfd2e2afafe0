"""LoRA mechanics through peft: which modules of the U-ViT (and the CLIP text tower) get adapters, the
settings that rebuild them, and loading / merging their weights."""
from __future__ import annotations

import re
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from libs.files import CheckpointError, key_mismatches
from libs.errors import UserError
from libs.models.clip import CLIPTextEncoder
from libs.precision import place_for_inference
from libs.adapters.targets import (BLOCK_TARGETS, DEFAULT_UVIT_TARGETS, LORA_TARGETS, TEXT_LORA_TARGETS,  # noqa: F401
                                   TOP_LEVEL_TARGETS)


class LoraTargetError(UserError):
    """LoRA target names that are unknown or match no module."""


def uvit_lora_modules(nnet: nn.Module, targets: Sequence[str] = DEFAULT_UVIT_TARGETS) -> list[str]:
    """Full module names for LoRA. Block-level names (`qkv`, `proj`, `fc1`, `fc2`, `skip_linear`) only hit
    the transformer blocks; the patch-embedding conv is targeted only when `patch_embed.proj` is asked
    for by name (the reference entry hit it by accident through the bare name `proj`)."""
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown:
        raise LoraTargetError(f"unknown LoRA target(s) {unknown}; choose from {LORA_TARGETS}")
    block_paths = "|".join(re.escape(BLOCK_TARGETS[t]) for t in targets if t in BLOCK_TARGETS)
    top = [t for t in targets if t in TOP_LEVEL_TARGETS]
    patterns = [re.escape(t) for t in top]
    if block_paths:
        patterns.append(rf"(in_blocks\.\d+|mid_block|out_blocks\.\d+)\.({block_paths})")
    regex = re.compile("|".join(patterns))
    names = [name for name, module in nnet.named_modules() if regex.fullmatch(name) and isinstance(module, (nn.Linear, nn.Conv2d))]
    if not names:
        raise LoraTargetError(f"LoRA targets {list(targets)} match no module")
    return names


def text_lora_modules(text_encoder: CLIPTextEncoder) -> list[str]:
    """Attention projections of every CLIP text layer."""
    return [name for name, module in text_encoder.transformer.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TEXT_LORA_TARGETS]


@dataclass
class LoraSpec:
    """The LoRA settings that are stored in personalization.json and rebuilt at sampling."""

    r: int
    alpha: float
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)

    def peft_config(self) -> LoraConfig:
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=self.target_modules,
                          init_lora_weights=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LoraSpec":
        return cls(r=int(data["r"]), alpha=float(data["alpha"]), dropout=float(data.get("dropout", 0.0)),
                   target_modules=list(data["target_modules"]))

    def to_dict(self) -> dict[str, Any]:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "target_modules": self.target_modules}

    def num_parameters(self, model: nn.Module) -> int:
        """r·(d_in + d_out) per Linear, r·(C_in·k·k + C_out) per Conv2d: what the adapters add."""
        total = 0
        modules = dict(model.named_modules())
        for name in self.target_modules:
            module = modules[name]
            module = getattr(module, "base_layer", module)
            if isinstance(module, nn.Conv2d):
                total += self.r * (module.in_channels * module.kernel_size[0] * module.kernel_size[1] + module.out_channels)
            else:
                total += self.r * (module.in_features + module.out_features)
        return total


def require_targets(model: nn.Module, spec: LoraSpec, source: str | Path) -> None:
    """Every module a stored LoRA adapts exists in `model`; else a CheckpointError naming `source`."""
    known = dict(model.named_modules())
    absent = [name for name in spec.target_modules if name not in known]
    if absent:
        raise CheckpointError(f"{source} adapts modules this model does not have: {absent[:4]}")


def add_lora(model: nn.Module, spec: LoraSpec, for_loading: bool = False) -> nn.Module:
    """Inject peft LoRA layers in place (the model keeps its class and forward signature).

    `for_loading`: the adapter weights are left uninitialised on the meta device, because
    `load_lora_state(..., assign=True)` replaces every one of them next (no random init of millions of
    values that are thrown away)."""
    return inject_adapter_in_model(spec.peft_config(), model, low_cpu_mem_usage=for_loading)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return get_peft_model_state_dict(model)


def load_lora_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path,
                    assign: bool = False) -> None:
    """Load adapter weights; every adapter tensor in the file must exist in the model with the same shape.

    `assign` (after `add_lora(..., for_loading=True)`): the file's tensors, in the adapters' dtype, become
    the adapter weights on the device of the layer they adapt, as a copy into them would have made them."""
    expected = get_peft_model_state_dict(model)
    problems = key_mismatches(expected, state)
    if problems:
        raise CheckpointError("\n".join([f"{source} does not fit this base model (was it trained with another "
                                         "config, rank or base checkpoint?)", *problems]))
    if assign:
        state = {key: value.to(expected[key].dtype) for key, value in state.items()}
    set_peft_model_state_dict(model, dict(state), low_cpu_mem_usage=assign)


def merge_lora(model: nn.Module, source: str | Path = "the adapters", device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> int:
    """Fold every adapter delta (LoRA, or any peft family of libs/adapters/families.py) into its base weight
    (inference speed); returns the number of merged layers.

    The merged weight is a new tensor (peft's safe merge), so base weights shared with other models are never
    written; a delta holding NaN/inf is refused, naming `source`. With `dtype` the model ends on `device`
    placed for inference in `dtype` (libs.precision.place_for_inference), layer by layer: each adapted layer
    moves to the device, merges in its own precision (fp32) and only then is cast, and the rest follows one
    tensor at a time, so no full-precision copy of the whole model is ever made on the device."""
    merged = 0
    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and not module.merged:
            if device is not None:
                module.to(device)
            try:
                module.merge(safe_merge=True)
            except ValueError as error:  # peft: "NaNs detected in the merged weights"
                raise CheckpointError(f"{source}: the adapter weights hold NaN or inf values ({error})") from error
            if dtype is not None:
                place_for_inference(module, device, dtype)
            merged += 1
    if dtype is not None:
        place_for_inference(model, device, dtype)
    elif device is not None:
        model.to(device)
    return merged
