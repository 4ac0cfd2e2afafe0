"""The training log: one JSONL line per logged step under logs/ (and TensorBoard scalars and grids when
tensorboard is installed), and what a step's line holds."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from libs.files import atomic_path
from libs.train_output import LOG_DIR, LOG_FILE, TENSORBOARD_DIR


class RunLog:
    """JSONL lines under logs/ and TensorBoard scalars when tensorboard is installed (main process only).

    A run resumed from step k first drops what an interrupted run logged after step k, so the log reads
    like the one of an uninterrupted run.
    """

    def __init__(self, out_dir: Path, enabled: bool, start_step: int):
        self.enabled = enabled
        self.writer = None
        self.path = out_dir / LOG_DIR / LOG_FILE
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if start_step and self.path.is_file():
                kept = [line for line, record in log_lines(self.path) if record["step"] <= start_step]
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept))
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / LOG_DIR / TENSORBOARD_DIR),
                                            purge_step=start_step + 1 if start_step else None)
            except ImportError:
                self.writer = None

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def image(self, tag: str, image: Image.Image, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_log(out: Path) -> list[dict[str, Any]]:
    """The log lines of a run folder in order (training lines and validation lines share a step); a line
    that is not a JSON object with a step (a run killed mid-write) is left out."""
    return [record for _, record in log_lines(Path(out) / LOG_DIR / LOG_FILE)]


def log_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(text, record) of each line of the log file `path` that is a JSON object with a step: a line cut short
    by a killed run or damaged bytes are left out (the reports and a resumed run read what is whole)."""
    if not path.is_file():
        return []
    lines = []
    for text in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(text)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            lines.append((text, record))
    return lines


def step_logs(accelerator: Any, loss: Tensor, terms: dict[str, Tensor], scheduler: Any, grad_norm: Tensor | None,
              elapsed: float) -> dict[str, float]:
    """A step's log line: loss and its terms averaged over the processes, learning rates, gradient norm, time."""
    reduced = accelerator.reduce(torch.stack([loss.detach(), *(t.detach() for t in terms.values())]), "mean")
    logs = {"loss": reduced[0].item(), **{f"loss_{k}": v.item() for k, v in zip(terms, reduced[1:])}}
    lrs = scheduler.get_last_lr()
    logs["lr"] = lrs[0]
    if len(lrs) > 1:
        logs["text_lr"] = lrs[-1]
    if grad_norm is not None:
        logs["grad_norm"] = float(grad_norm)
    logs["elapsed_s"] = round(elapsed, 2)
    return logs
