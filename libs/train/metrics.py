"""The competition metric during training: the scorer that judges the validation set's images
(libs/train/validation_set.py) with exactly the code score.py runs.

The references are the subject's photos in `-d` (the competition scores against train_data/<name>;
when `-d` holds the crops, CLIP-I is measured against the crops). A validated step's images are written
in the competition's layout, `validation/step-000100/<name>_sim/{i}-{idx:03}.jpg` (JPEG quality 95, as
sample.py), and scored as decoded from those files, so

    python score.py --dataset <parent of -d> --prompts <out>/validation/prompts \
        --outputs <out>/validation/step-000100 --tasks <name> --face_backend <the run's>

gives the logged numbers when `validation_images` is 3 (score.py reads three images per prompt).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import ml_collections
import numpy as np

from libs.config import KEY_CHOICES
from libs.errors import UserError
from libs.face import FaceBackend, FaceModelFailed, DetectedFace, get_face_backend
from libs.score.results import ScoreResult, TaskResult
from libs.score.scorer import Scorer, ScoringWarning
from libs.layout import ADVANCED, ADVANCED_SPLITS
from libs.train.validation_set import Rendered

FACE_BACKEND_CHOICES = KEY_CHOICES["train.validation_face_backend"]


@dataclass
class ValidationScores:
    """The five advanced numbers of one step and how face identity was measured."""

    values: dict[str, float]  # sim_face, sim_clip_img, edit_face, edit_clip_img, edit_clip_text
    face_backend: str
    face_usable: bool  # False: no face model, or no face in any reference photo (face terms are all 0)
    result: ScoreResult | None = None


ScoreFn = Callable[[Rendered], ValidationScores]
"""Scores a validated step; `train(score_fn=...)` takes any (MetricScorer is the default)."""


class NoFaceBackend(FaceBackend):
    """No usable face model: finds no face, so every face score is 0 (selection then uses CLIP-I instead)."""

    name = "none"
    comparable_with_competition = False
    min_score = 0.0

    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        return []

    def similarity(self, a: np.ndarray, b: np.ndarray) -> float:
        return 0.0


def validation_face_backend(name: str) -> FaceBackend:
    """The backend validation scores faces with: insightface (buffalo_l) when installed, else dlib (libs.face
    says which, once); "auto" with neither installed falls back to none and says so, but an installed model that
    cannot be loaded (FaceModelFailed) is an error: its scores would silently change what "best" means."""
    if name == "none":
        return NoFaceBackend()
    if name != "auto":
        return get_face_backend(name)
    try:
        return get_face_backend("auto")
    except FaceModelFailed:
        raise  # installed but damaged: said, never silently replaced by CLIP-only scores
    except (UserError, ImportError, OSError, RuntimeError) as error:
        print(f"validation: no face model usable ({str(error).splitlines()[0]}); face scores are 0 and the "
              "best step is chosen by CLIP image/text similarity")
        return NoFaceBackend()


class MetricScorer:
    """libs.score.scorer's Scorer (face backend + CLIP ViT-B/32, loaded once, references cached per folder)
    applied to a validated step, aggregated as score.py aggregates the advanced split."""

    def __init__(self, config: ml_collections.ConfigDict, face_backend: str = "auto", device: str = "cpu"):
        self.scorer = Scorer(validation_face_backend(face_backend), config=config, device=str(device),
                             progress=False)
        self._warned: set[str] = set()

    @property
    def face_backend(self) -> str:
        return self.scorer.face.name

    def __call__(self, rendered: Rendered) -> ValidationScores:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ScoringWarning)  # said once below, not at every step
            references = self.scorer.references(rendered.ref_dir).references
        usable = self.face_backend != NoFaceBackend.name and any(ref.face_found for ref in references)
        if not usable and str(rendered.ref_dir) not in self._warned:
            self._warned.add(str(rendered.ref_dir))
            if self.face_backend != NoFaceBackend.name:
                print(f"validation: no face found by {self.face_backend} in any photo of {rendered.ref_dir}: "
                      "face scores are 0 and the best step is chosen by CLIP image/text similarity")
        vset = rendered.validation_set
        result = ScoreResult(ADVANCED, self.face_backend, self.scorer.face.comparable_with_competition)
        for split in ADVANCED_SPLITS:
            name = vset.task_name(split)
            prompts = [self.scorer.score_images(rendered.ref_dir, prompt, rendered.images[split][index], index)
                       for index, prompt in enumerate(vset.prompts[split])]
            result.tasks[name] = TaskResult(name, str(rendered.ref_dir), str(rendered.folder / name), references,
                                            prompts)
        return ValidationScores(dict(result.advanced), self.face_backend, usable, result)
