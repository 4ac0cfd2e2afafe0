"""The personalization folder type: what a restore folder held and was applied, whichever format it was in."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libs.files import CheckpointError


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
        if self.meta.get("text_encoder_mode") in ("lora", "full"):
            parts.append(f"text encoder {self.meta['text_encoder_mode']}")
        return ", ".join(parts)


def base_model(label: str = "--base_model") -> Personalization:
    """The deliberate absence of a personalization."""
    return Personalization(kind="none", path=Path(label))


class NotAPersonalization(CheckpointError):
    """The restore folder holds no personalization (a typo'd path, or a run that never finished)."""
