"""The adapter families of the U-ViT, each through peft's own config class: LoRA (today's default),
DoRA, LoHa, LoKr, VeRA and OFT on the same target modules.

The family decides what trains and so what the spec §7 count finds: every family's trained tensors are
parameters of the adapted layers (counted), while VeRA's shared random projections are buffers generated
from a recorded seed (not trained, not counted, regenerated at load) and OFT's block indices are buffers
too. LoRA keeps libs/lora.py's exact path (same peft config, same files, same personalization.json entry).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import ml_collections
from peft import LoHaConfig, LoKrConfig, LoraConfig, OFTConfig, PeftConfig, VeraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTuner
from peft.tuners.vera import VeraModel
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
import torch
from torch import nn

from libs.config import KEY_CHOICES
from libs.errors import UserError
from libs.adapters.lora import LoraSpec, add_lora, load_lora_state

ADAPTERS = KEY_CHOICES["train.adapter"]  # --adapter: a family, or none (the U-ViT stays the base: token / text only)
FAMILIES = tuple(name for name in ADAPTERS if name != "none")
# the layer types peft can adapt per family (peft raises a TypeError deep in the injection otherwise)
SUPPORTED_LAYERS: dict[str, tuple[type[nn.Module], ...]] = {
    "lora": (nn.Linear, nn.Conv2d), "dora": (nn.Linear, nn.Conv2d), "loha": (nn.Linear, nn.Conv2d),
    "lokr": (nn.Linear, nn.Conv2d), "vera": (nn.Linear,), "oft": (nn.Linear, nn.Conv2d),
}
# the config.train keys that size each family (besides lora_targets); written into personalization.json
FAMILY_KEYS = {"lora": ("rank", "alpha", "lora_dropout"), "dora": ("rank", "alpha", "lora_dropout"),
               "loha": ("rank", "alpha"), "lokr": ("rank", "alpha", "lokr_factor"),
               "vera": ("vera_rank", "lora_dropout"), "oft": ("oft_block_size",)}


class AdapterTargetError(UserError):
    """A family that cannot adapt a chosen target module (its layer type or shape)."""


FAMILY_NAMES = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr", "vera": "VeRA", "oft": "OFT"}
"""How each family is spelled in what the user reads."""


@dataclass
class AdapterSpec:
    """One family's settings on its target modules: what personalization.json records and sample.py rebuilds.

    `r` is the family's rank (VeRA: the rank of its shared projections), `factor` LoKr's decomposition
    factor (0: as square as possible), `block_size` OFT's block size, `projection_seed` the seed VeRA's
    shared projections are generated from."""

    family: str
    r: int = 0
    alpha: float = 0.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)
    factor: int = 0
    block_size: int = 0
    projection_seed: int = 0

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict, target_modules: list[str], seed: int) -> "AdapterSpec":
        """The spec of `cfg.adapter` (a family, not none) from the train keys that size it (the others are
        not recorded)."""
        family = str(cfg.adapter)
        if family not in FAMILIES:
            raise AdapterTargetError(f"unknown adapter {family!r}; choose from {', '.join(FAMILIES)}")
        keys = FAMILY_KEYS[family]
        return cls(family=family, r=int(cfg.vera_rank if family == "vera" else cfg.rank if "rank" in keys else 0),
                   alpha=float(cfg.alpha) if "alpha" in keys else 0.0,
                   dropout=float(cfg.lora_dropout) if "lora_dropout" in keys else 0.0,
                   target_modules=list(target_modules), factor=int(cfg.lokr_factor) if family == "lokr" else 0,
                   block_size=int(cfg.oft_block_size) if family == "oft" else 0,
                   projection_seed=int(seed) if family == "vera" else 0)

    def lora_spec(self) -> LoraSpec:
        """LoRA and DoRA: libs.lora's spec (LoRA's personalization.json entry and peft config, unchanged)."""
        return LoraSpec(r=self.r, alpha=self.alpha, dropout=self.dropout, target_modules=self.target_modules)

    def peft_config(self) -> PeftConfig:
        """peft's own config class of the family, with identity-at-start initialisation."""
        targets = self.target_modules
        if self.family == "lora":
            return self.lora_spec().peft_config()
        if self.family == "dora":
            return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets,
                              init_lora_weights=True, use_dora=True)
        if self.family == "loha":
            return LoHaConfig(r=self.r, alpha=self.alpha, target_modules=targets, init_weights=True)
        if self.family == "lokr":
            return LoKrConfig(r=self.r, alpha=self.alpha, target_modules=targets, init_weights=True,
                              decompose_factor=self.factor or -1)
        if self.family == "vera":
            with warnings.catch_warnings():  # peft advises saving the projections: regenerating them is the point
                warnings.filterwarnings("ignore", message="Specified to not save vera_A and vera_B")
                return VeraConfig(r=self.r, vera_dropout=self.dropout, target_modules=targets, init_weights=True,
                                  save_projection=False, projection_prng_key=self.projection_seed)
        if self.family == "oft":
            return OFTConfig(r=0, oft_block_size=self.block_size, target_modules=targets, init_weights=True)
        raise AdapterTargetError(f"unknown adapter {self.family!r}; choose from {', '.join(FAMILIES)}")

    @property
    def prefix(self) -> str:
        """The name part that marks the family's trained tensors (peft's tuner prefix, e.g. `lora_`, `hada_`)."""
        tuner: type[BaseTuner] = PEFT_TYPE_TO_TUNER_MAPPING[self.peft_config().peft_type]
        return tuner.prefix

    def to_dict(self) -> dict[str, Any]:
        """personalization.json's entry: LoRA's as libs.lora writes it; the others name their family."""
        if self.family == "lora":
            return self.lora_spec().to_dict()
        entry: dict[str, Any] = {"family": self.family, "r": self.r}
        if self.family in ("dora", "loha", "lokr"):
            entry["alpha"] = self.alpha
        if self.family in ("dora", "vera"):
            entry["dropout"] = self.dropout
        if self.family == "lokr":
            entry["factor"] = self.factor
        if self.family == "oft":
            entry = {"family": "oft", "block_size": self.block_size}
        if self.family == "vera":
            entry["projection_seed"] = self.projection_seed
        entry["target_modules"] = self.target_modules
        return entry

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AdapterSpec":
        """The inverse of `to_dict` (an entry without `family` is LoRA's)."""
        family = data.get("family", "lora")
        return cls(family=family, r=int(data.get("r", 0)), alpha=float(data.get("alpha", 0.0)),
                   dropout=float(data.get("dropout", 0.0)), target_modules=list(data["target_modules"]),
                   factor=int(data.get("factor", 0)), block_size=int(data.get("block_size", 0)),
                   projection_seed=int(data.get("projection_seed", 0)))

    def describe(self) -> str:
        """The family and its size in words (the training summary, sample.py's personalization line)."""
        size = {"oft": f"block size {self.block_size}", "vera": f"projection rank {self.r}",
                "lokr": f"r={self.r} alpha={self.alpha} factor {self.factor or 'auto'}"}.get(
            self.family, f"r={self.r} alpha={self.alpha}")
        return f"U-ViT {FAMILY_NAMES[self.family]} {size} on {len(self.target_modules)} modules"


def check_targets(model: nn.Module, spec: AdapterSpec) -> None:
    """Every target is a layer the family can adapt (type, and OFT's block size dividing its input size);
    else an AdapterTargetError naming the family and the module, before anything is injected or written."""
    modules = dict(model.named_modules())
    allowed = SUPPORTED_LAYERS[spec.family]
    for name in spec.target_modules:
        module = modules[name]
        if not isinstance(module, allowed):
            kinds = " or ".join(kind.__name__ for kind in allowed)
            raise AdapterTargetError(f"adapter {spec.family} cannot adapt {name} (a {type(module).__name__}; "
                                     f"{spec.family} adapts {kinds} layers only): drop it from --lora_targets "
                                     "or choose another --adapter")
        if spec.family == "oft":
            size = (module.in_features if isinstance(module, nn.Linear)
                    else module.in_channels * module.kernel_size[0] * module.kernel_size[1])
            if size % spec.block_size:
                raise AdapterTargetError(f"adapter oft cannot adapt {name}: its input size {size} is not a multiple "
                                         f"of --oft_block_size {spec.block_size}; choose a block size that divides "
                                         "the input size of every target")


def add_adapter(model: nn.Module, spec: AdapterSpec, for_loading: bool = False) -> nn.Module:
    """Inject the family's peft layers in place (the model keeps its class and forward signature).

    LoRA goes through libs.lora.add_lora unchanged. VeRA's shared projections live on peft's tuner object,
    which `inject_adapter_in_model` refuses for that reason; every VeRA layer holds a reference to them, so
    the tuner is built directly and its model (the same module, now adapted) is kept. `for_loading`: the
    trained tensors start uninitialised on the meta device (the file's replace them next)."""
    check_targets(model, spec)
    if spec.family == "lora":
        return add_lora(model, spec.lora_spec(), for_loading=for_loading)
    if spec.family == "vera":
        return VeraModel(model, spec.peft_config(), "default", low_cpu_mem_usage=for_loading).model
    return inject_adapter_in_model(spec.peft_config(), model, low_cpu_mem_usage=for_loading)


def load_adapter_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """The saved trained tensors into the adapters `add_adapter(..., for_loading=True)` injected: strict (a
    file of another family or size is a CheckpointError listing the keys and shapes that differ). VeRA's
    projections are not in the file by design (regenerated from the recorded seed): peft's warning about
    that is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Specified to not load vera_A and vera_B")
        load_lora_state(model, state, source, assign=True)
