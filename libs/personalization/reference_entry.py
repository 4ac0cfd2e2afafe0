"""The reference entry's output folder, read so sample.py can compare against (or submit) it:

    <new1>.bin                      torch pickle {"<new1>": [768]}
    lora.pt (or lora.pt.tmp)        peft state dict, `base_model.model.<module>.lora_A.default.weight`
    adapter_config.json             optional; its `lora_alpha` replaces the entry's alpha of 32

Everything is checked before use; the pickles are read with `weights_only=True`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from libs.files import CheckpointError, safe_torch_load
from libs.adapters.lora import LoraSpec, add_lora, load_lora_state, require_targets
from libs.models.clip import CLIPTextEncoder
from libs.personalization.folder import Personalization, add_token

REFERENCE_LORA_FILES = ("lora.pt", "lora.pt.tmp")  # the entry renamed .tmp only after a clean finish
REFERENCE_ADAPTER_CONFIG = "adapter_config.json"
REFERENCE_LORA_ALPHA = 32.0
REFERENCE_LORA_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<part>[AB])(?:\.(?P<adapter>[^.]+))?\.weight")


def is_reference_entry(restore_path: Path) -> bool:
    """The folder holds the entry's LoRA file or token pickle."""
    return bool(_reference_lora_file(restore_path) or _reference_token_files(restore_path))


def _reference_lora_file(restore_path: Path) -> Path | None:
    return next((restore_path / name for name in REFERENCE_LORA_FILES if (restore_path / name).is_file()), None)


def _reference_token_files(restore_path: Path) -> list[Path]:
    return sorted(restore_path.glob("*.bin"))


def _reference_token(restore_path: Path, hidden_size: int) -> tuple[str, torch.Tensor] | None:
    """The one `{token: vector}` pickle of the entry, as [n, hidden] rows."""
    found: dict[str, tuple[Path, torch.Tensor]] = {}
    for path in _reference_token_files(restore_path):
        data = safe_torch_load(path, "token embedding")
        if not isinstance(data, Mapping) or not data or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
            raise CheckpointError(f"{path} is not a token embedding file (expected a dict {{token: tensor}})")
        found.update({token: (path, vector) for token, vector in data.items()})
    if not found:
        return None
    if len(found) > 1:
        raise CheckpointError(f"{restore_path} holds {len(found)} token embeddings ({sorted(found)}); one is supported")
    (token, (path, vector)), = found.items()
    if vector.numel() == 0 or vector.numel() % hidden_size:
        raise CheckpointError(f"{path}: {token} has shape {tuple(vector.shape)}, "
                              f"the text encoder needs {hidden_size}-d rows")
    return token, vector.detach().float().reshape(-1, hidden_size)


def _reference_lora(path: Path, restore_path: Path) -> tuple[LoraSpec, dict[str, torch.Tensor]]:
    """Rebuild the LoRA settings from the state dict itself: rank from lora_A, targets from the key names."""
    state = safe_torch_load(path, "LoRA weights")
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{path} is not a LoRA state dict")
    converted: dict[str, torch.Tensor] = {}
    adapters, unknown = set(), []
    for key, value in state.items():
        match = REFERENCE_LORA_KEY.fullmatch(key) if isinstance(key, str) else None
        if match is None or not isinstance(value, torch.Tensor):
            unknown.append(str(key))
            continue
        adapters.add(match["adapter"])
        converted[f"{match['module']}.lora_{match['part']}.weight"] = value
    if unknown:
        raise CheckpointError(f"{path} holds tensors that are not LoRA weights: {', '.join(unknown[:4])}"
                              f"{' ...' if len(unknown) > 4 else ''}")
    if len(adapters) > 1:
        raise CheckpointError(f"{path} mixes several adapters ({sorted(map(str, adapters))}); one is supported")
    modules = sorted({key.rsplit(".lora_", 1)[0] for key in converted})
    halves = [m for m in modules if f"{m}.lora_A.weight" not in converted or f"{m}.lora_B.weight" not in converted]
    if halves:
        raise CheckpointError(f"{path}: LoRA of {', '.join(halves[:4])} lacks its lora_A or lora_B weight")
    ranks = {converted[f"{m}.lora_A.weight"].shape[0] for m in modules}
    if len(ranks) != 1:
        raise CheckpointError(f"{path}: lora_A weights have different ranks {sorted(ranks)}; one rank is supported")
    alpha = REFERENCE_LORA_ALPHA
    config_file = restore_path / REFERENCE_ADAPTER_CONFIG
    if config_file.is_file():
        try:
            alpha = float(json.loads(config_file.read_text())["lora_alpha"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"cannot read lora_alpha from {config_file}: {error}") from error
    return LoraSpec(r=ranks.pop(), alpha=alpha, target_modules=modules), converted


def load_reference_entry(restore_path: Path, nnet: nn.Module, text_encoder: CLIPTextEncoder) -> Personalization:
    """The reference entry's `<new1>.bin` + `lora.pt(.tmp)`, applied like our own format (unmerged)."""
    meta: dict[str, Any] = {"source_files": []}
    token = _reference_token(restore_path, text_encoder.hidden_size)
    lora_file = _reference_lora_file(restore_path)
    if lora_file is not None:
        spec, state = _reference_lora(lora_file, restore_path)
        require_targets(nnet, spec, lora_file)
        add_lora(nnet, spec, for_loading=True)
        load_lora_state(nnet, state, lora_file, assign=True)
        meta["uvit_lora"] = spec.to_dict()
        meta["source_files"].append(lora_file.name)
    if token is not None:
        add_token(text_encoder, *token, restore_path)
        meta["source_files"].extend(p.name for p in _reference_token_files(restore_path))
    nnet.eval()
    text_encoder.eval()
    return Personalization(kind="reference_entry", path=restore_path, meta=meta,
                           modifier_token=token[0] if token else None)
