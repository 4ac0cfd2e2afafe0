"""An exponential moving average (EMA) of the trained tensors (`--ema_decay`, 0 = off).

After every optimizer step avg <- decay * avg + (1 - decay) * value, starting from the initial values. The
average is what validation renders and scores, what best-step selection keeps as a candidate and what the
personalization folder holds; training itself goes on from the raw values. The average is saved with every
checkpoint (ema.safetensors), so a resumed run continues it exactly.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from libs.files import CheckpointError, key_mismatches, load_safetensors


class Ema:
    """The average of `model`'s trained tensors (those with requires_grad), or nothing when `decay` is 0."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad} if self.decay > 0 else {}
        self.average = {name: p.detach().clone() for name, p in self.params.items()}

    @property
    def enabled(self) -> bool:
        return self.decay > 0

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average (after the optimizer step)."""
        if self.enabled:
            names = list(self.params)
            torch._foreach_lerp_([self.average[n] for n in names], [self.params[n].detach() for n in names],
                                 1.0 - self.decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the average inside the block and its raw values again after it."""
        if not self.enabled:
            yield
            return
        raw = {name: p.detach().clone() for name, p in self.params.items()}
        self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(raw[name])

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Put the average into the model for good (the end of training: what is written)."""
        for name, p in self.params.items():
            p.copy_(self.average[name])

    def state(self) -> dict[str, torch.Tensor] | None:
        """The average as a checkpoint stores it (None when off)."""
        return self.average if self.enabled else None

    def load(self, path: Path) -> None:
        """The average a checkpoint stored; names and shapes must be this run's."""
        if not self.enabled:
            return
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the checkpoint was written without --ema_decay; resume "
                                  "with the settings it was written with, or pass --overwrite to start over")
        saved = load_safetensors(path, "EMA of the trained tensors")
        problems = key_mismatches(self.average, saved)
        if problems:
            raise CheckpointError("\n".join([f"{path} does not fit this model", *problems]))
        with torch.no_grad():
            for name, tensor in saved.items():
                self.average[name].copy_(tensor)
