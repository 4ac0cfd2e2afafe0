"""The personalization folder type: what a restore folder held and was applied, whichever format it was in,
and the step both formats share (the token rows into the text encoder)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from libs.files import CheckpointError
from libs.models.clip import CLIPTextEncoder


@dataclass
class Personalization:
    """What `load_personalization` found and applied."""

    kind: str  # "ours", "reference_entry" or "none"
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    modifier_token: str | None = None
    class_word: str | None = None

    def describe(self) -> str:
        if self.kind == "none":
            return "no personalization (--base_model): sampling the plain base model"
        parts = [f"{self.kind} personalization from {self.path}"]
        if self.modifier_token:
            parts.append(f"token {self.modifier_token}")
        if self.meta.get("uvit_lora"):
            lora = self.meta["uvit_lora"]
            parts.append(f"U-ViT LoRA r={lora['r']} alpha={lora['alpha']} on {len(lora['target_modules'])} modules")
        if self.meta.get("uvit_adapter"):
            from libs.adapters.families import AdapterSpec  # peft only when a folder names a family

            parts.append(AdapterSpec.from_dict(self.meta["uvit_adapter"]).describe())
        if self.meta.get("text_encoder_mode") in ("lora", "full"):
            parts.append(f"text encoder {self.meta['text_encoder_mode']}")
        return ", ".join(parts)


def base_model(label: str = "--base_model") -> Personalization:
    """The deliberate absence of a personalization."""
    return Personalization(kind="none", path=Path(label))


def add_token(text_encoder: CLIPTextEncoder, token: str, rows: torch.Tensor, source: Path) -> None:
    """Put a personalization's token rows into the text encoder (either format); `source` names the file."""
    try:
        text_encoder.add_modifier_token(token, rows, num_vectors=rows.shape[0])
    except ValueError as error:
        raise CheckpointError(f"{source}: cannot add token {token!r}: {error}") from error


class NotAPersonalization(CheckpointError):
    """The restore folder holds no personalization (a typo'd path, or a run that never finished)."""
