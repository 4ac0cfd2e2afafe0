"""The competition's metrics as one table (spec §8). Each row says what a metric is called in code and in
the printed competition dicts, how people read it, which advanced splits report it, how its numbers are
averaged, and the per-image function that computes it. Everything else reads this table: the means at the
prompt, task and summary levels (libs/score/results.py), the JSON/CSV/HTML reports and score.py's lines
(libs/score/report.py), and the vocabulary of training's selection objective (libs/train/selection.py).

Adding a metric = one row here + its per-image function.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from libs.layout import ADVANCED_SPLITS


def mean(values: Iterable[float]) -> float:
    """The competition's average at every level; a missing or unreadable image has already counted as 0."""
    values = list(values)
    return float(sum(values) / len(values)) if values else 0.0


@dataclass(frozen=True)
class ImageView:
    """What a per-image function sees: the image's CLIP features, its prompt's, the references', and the
    face similarities to each reference face (empty when the image has no detected face)."""

    features: torch.Tensor  # [D], L2-normalized CLIP ViT-B/32 image embedding
    text: torch.Tensor  # [D], the prompt's CLIP text embedding
    references: torch.Tensor  # [N, D], the reference photos' CLIP image embeddings
    face_similarities: np.ndarray  # cosine to each reference face


def face(view: ImageView) -> float:
    """max(0, max over refs-with-a-face of face similarity); 0 when the image or no reference has a face."""
    return max(0.0, float(view.face_similarities.max())) if view.face_similarities.size else 0.0


def clip_img(view: ImageView) -> float:
    """max(0, max over all refs of the CLIP image cosine)."""
    return max(0.0, float((view.references @ view.features).max()))


def clip_text(view: ImageView) -> float:
    """max(0, cosine between the image and its prompt (truncated to 77 tokens))."""
    return max(0.0, float(view.features @ view.text))


@dataclass(frozen=True)
class Metric:
    name: str  # the one spelling in code, the JSON/CSV fields and the advanced keys (`sim_<name>`)
    label: str  # how the report's reader sees it
    preliminary_key: str | None  # its key in the printed preliminary dict (the competition's spelling); None: not printed
    advanced_splits: tuple[str, ...]  # the advanced prompt sets whose summary reports it (`<split>_<name>`)
    per_image: Callable[[ImageView], float]
    average: Callable[[Iterable[float]], float] = mean  # image -> prompt -> task -> summary


METRICS = (
    Metric("face", "face similarity", "face", ("sim", "edit"), face),
    Metric("clip_img", "CLIP image similarity", "img_clip", ("sim", "edit"), clip_img),
    Metric("clip_text", "CLIP text similarity", "text_clip", ("edit",), clip_text),
)
METRIC_NAMES = tuple(metric.name for metric in METRICS)
BY_NAME = {metric.name: metric for metric in METRICS}
ADVANCED_KEYS = tuple(f"{split}_{metric.name}" for split in ADVANCED_SPLITS for metric in METRICS
                      if split in metric.advanced_splits)
"""The five advanced numbers in the competition's order: sim_face, sim_clip_img, edit_face, edit_clip_img,
edit_clip_text (what validation logs and the selection objective combines)."""
