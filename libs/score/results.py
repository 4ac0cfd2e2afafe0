"""What scoring produces (spec §8): per-image scores, their means in the competition's order and the
summary dicts the graders read.

Means go the 3 images of a prompt -> prompt, prompts -> task, tasks -> summary (every task weighs the
same); a missing or unreadable image counts as 0 on all three metrics.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from libs.layout import ADVANCED
from libs.models.clip import MAX_LENGTH



def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else 0.0


@dataclass
class ImageScore:
    path: str
    prompt_index: int
    idx: int
    found: bool  # the file exists and could be read
    face_found: bool
    face: float = 0.0
    clip_img: float = 0.0
    clip_text: float = 0.0
    error: str | None = None  # why a missing/unreadable image scored 0


@dataclass
class PromptScore:
    index: int
    prompt: str
    num_tokens: int  # CLIP tokens including start/end; > 77 means the prompt was truncated
    images: list[ImageScore]

    @property
    def truncated(self) -> bool:
        return self.num_tokens > MAX_LENGTH

    @property
    def face(self) -> float:
        return _mean(image.face for image in self.images)

    @property
    def clip_img(self) -> float:
        return _mean(image.clip_img for image in self.images)

    @property
    def clip_text(self) -> float:
        return _mean(image.clip_text for image in self.images)

    def to_dict(self) -> dict:
        return {"index": self.index, "prompt": self.prompt, "num_tokens": self.num_tokens, "truncated": self.truncated,
                "face": self.face, "clip_img": self.clip_img, "clip_text": self.clip_text,
                "images": [vars(image) for image in self.images]}


@dataclass
class Reference:
    path: str
    face_found: bool


@dataclass
class TaskResult:
    task: str
    ref_dir: str
    output_dir: str
    references: list[Reference]
    prompts: list[PromptScore]

    @property
    def face(self) -> float:
        return _mean(prompt.face for prompt in self.prompts)

    @property
    def clip_img(self) -> float:
        return _mean(prompt.clip_img for prompt in self.prompts)

    @property
    def clip_text(self) -> float:
        return _mean(prompt.clip_text for prompt in self.prompts)

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
        return _mean(1.0 if image.face_found else 0.0 for image in present)

    @property
    def reference_faces(self) -> int:
        return sum(ref.face_found for ref in self.references)

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "face": self.face,
            "clip_img": self.clip_img,
            "clip_text": self.clip_text,
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
        """`{face, img_clip, text_clip}`: means over tasks of the task means."""
        tasks = list(self.tasks.values())
        return {"face": _mean(t.face for t in tasks), "img_clip": _mean(t.clip_img for t in tasks),
                "text_clip": _mean(t.clip_text for t in tasks)}

    @property
    def advanced(self) -> dict[str, float] | None:
        """The five advanced numbers, each a mean over the subjects' `<name>_sim` / `<name>_edit` tasks."""
        if self.split != ADVANCED:
            return None
        sim = [t for name, t in self.tasks.items() if name.endswith("_sim")]
        edit = [t for name, t in self.tasks.items() if name.endswith("_edit")]
        return {"sim_face": _mean(t.face for t in sim), "sim_clip_img": _mean(t.clip_img for t in sim),
                "edit_face": _mean(t.face for t in edit), "edit_clip_img": _mean(t.clip_img for t in edit),
                "edit_clip_text": _mean(t.clip_text for t in edit)}

    @property
    def summary(self) -> dict[str, float]:
        return self.advanced if self.split == ADVANCED else self.preliminary

    def to_dict(self) -> dict:
        return {"split": self.split, "summary": self.summary, "face_backend": self.face_backend,
                "comparable_with_competition": self.comparable_with_competition,
                "tasks": {name: task.to_dict() for name, task in self.tasks.items()}}
