"""What scoring produces (spec §8): per-image scores, their means in the competition's order and the
summary dicts the graders read.

Means go the 3 images of a prompt -> prompt, prompts -> task, tasks -> summary (every task weighs the
same), for every metric of libs/score/metrics.py's table; a missing or unreadable image counts as 0 on
every metric.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from libs.layout import ADVANCED, ADVANCED_SPLITS
from libs.models.clip import MAX_LENGTH
from libs.score.metrics import BY_NAME, METRIC_NAMES, METRICS, mean


class MetricMeans:
    """`.face`, `.clip_img`, `.clip_text` (every metric of the table) as the average over the level below,
    the list in the attribute named by PARTS."""

    PARTS = ""

    def __getattr__(self, name: str) -> float:
        if name in BY_NAME:
            return BY_NAME[name].average(getattr(part, name) for part in getattr(self, self.PARTS))
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def means(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in METRIC_NAMES}


@dataclass
class ImageScore:
    path: str
    prompt_index: int
    idx: int
    found: bool  # the file exists and could be read
    face_found: bool
    scores: dict[str, float] = field(default_factory=lambda: dict.fromkeys(METRIC_NAMES, 0.0))
    error: str | None = None  # why a missing/unreadable image scored 0

    def __getattr__(self, name: str) -> float:
        if name in BY_NAME:
            return self.scores[name]
        raise AttributeError(f"ImageScore has no attribute {name!r}")

    def to_dict(self) -> dict:
        return {"path": self.path, "prompt_index": self.prompt_index, "idx": self.idx, "found": self.found,
                "face_found": self.face_found, **self.scores, "error": self.error}


@dataclass
class PromptScore(MetricMeans):
    index: int
    prompt: str
    num_tokens: int  # CLIP tokens including start/end; > 77 means the prompt was truncated
    images: list[ImageScore]
    PARTS = "images"

    @property
    def truncated(self) -> bool:
        return self.num_tokens > MAX_LENGTH

    def to_dict(self) -> dict:
        return {"index": self.index, "prompt": self.prompt, "num_tokens": self.num_tokens, "truncated": self.truncated,
                **self.means(), "images": [image.to_dict() for image in self.images]}


@dataclass
class Reference:
    path: str
    face_found: bool


@dataclass
class TaskResult(MetricMeans):
    task: str
    ref_dir: str
    output_dir: str
    references: list[Reference]
    prompts: list[PromptScore]
    PARTS = "prompts"

    @property
    def images(self) -> list[ImageScore]:
        return [image for prompt in self.prompts for image in prompt.images]

    @property
    def missing(self) -> list[str]:
        return [image.path for image in self.images if not image.found]

    @property
    def face_detection_rate(self) -> float:
        """Share of the generated images that exist in which a face was found."""
        present = [image for image in self.images if image.found]
        return mean(1.0 if image.face_found else 0.0 for image in present)

    @property
    def reference_faces(self) -> int:
        return sum(ref.face_found for ref in self.references)

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            **self.means(),
            "face_detection_rate": self.face_detection_rate,
            "reference_faces": self.reference_faces,
            "missing": self.missing,
            "ref_dir": self.ref_dir,
            "output_dir": self.output_dir,
            "references": [vars(ref) for ref in self.references],
            "prompts": [prompt.to_dict() for prompt in self.prompts],
        }


@dataclass
class ScoreResult:
    """One split's tasks plus the competition's summary numbers for that split."""

    split: str  # PRELIMINARY or ADVANCED
    face_backend: str
    comparable_with_competition: bool
    tasks: dict[str, TaskResult] = field(default_factory=dict)

    @property
    def preliminary(self) -> dict[str, float]:
        """`{face, img_clip, text_clip}`: means over tasks of the task means, keyed as the competition prints them."""
        tasks = list(self.tasks.values())
        return {metric.preliminary_key: metric.average(getattr(t, metric.name) for t in tasks) for metric in METRICS
                if metric.preliminary_key}

    @property
    def advanced(self) -> dict[str, float] | None:
        """The five advanced numbers (ADVANCED_KEYS), each a mean over the subjects' `<name>_sim` / `<name>_edit`
        tasks."""
        if self.split != ADVANCED:
            return None
        by_split = {split: [t for name, t in self.tasks.items() if name.endswith(f"_{split}")] for split in ADVANCED_SPLITS}
        return {f"{split}_{metric.name}": metric.average(getattr(t, metric.name) for t in by_split[split])
                for split in ADVANCED_SPLITS for metric in METRICS if split in metric.advanced_splits}

    @property
    def summary(self) -> dict[str, float]:
        return self.advanced if self.split == ADVANCED else self.preliminary

    def to_dict(self) -> dict:
        return {"split": self.split, "summary": self.summary, "face_backend": self.face_backend,
                "comparable_with_competition": self.comparable_with_competition,
                "tasks": {name: task.to_dict() for name, task in self.tasks.items()}}
