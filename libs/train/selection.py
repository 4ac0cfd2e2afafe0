"""Best-step selection: which validated step's adapters a run writes to `-o`.

The objective is a weighted sum of the competition's advanced numbers (spec §8), written in the config
as text, e.g. the default

    sim_face + edit_face + edit_clip_text

(each term `[weight*]metric`, metrics from METRICS). The parameter count is the same at every step of
one run, so it is not a term here; libs/train/auto_recipe.py adds it when recipes are compared. When no
face model is usable (or no reference photo has a detectable face) every face term is replaced by the
CLIP image term of its split (`sim_face` -> `sim_clip_img`), and the run says so.

Candidates: the trainable tensors of the best step so far are kept in `<out>/candidates/step-*.safetensors`,
plus the best step recorded in each checkpoint still on disk (what a resume from that checkpoint needs);
everything else is deleted as soon as it is beaten, so at most `checkpoints_total_limit + 1` candidates
exist. They are removed when the run writes its result.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from libs.config import KEY_CHOICES
from libs.files import CheckpointError, LazySafetensors, save_safetensors
from libs.score.metrics import ADVANCED_KEYS
from libs.errors import UserError
from libs.train.checkpoints import load_trainable, trainable_state
from libs.train_output import (CANDIDATE_DIR, CHECKPOINT_STATE, candidate_files, candidate_path, candidate_step,
                               list_checkpoints)

METRICS = ADVANCED_KEYS
"""The objective's vocabulary: the competition's advanced numbers (libs/score/metrics.py), what validation logs."""
FACE_FALLBACK = {"sim_face": "sim_clip_img", "edit_face": "edit_clip_img"}
SELECTION_MODES = KEY_CHOICES["train.selection"]
_TERM = re.compile(r"^\s*(?:(?P<weight>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*\*\s*)?(?P<metric>[a-z_]+)\s*$")


class SelectionError(UserError):
    """A bad objective, or recorded validation scores that a resumed run cannot continue."""


@dataclass(frozen=True)
class Objective:
    """A weighted sum of validation metrics; higher is better."""

    weights: tuple[tuple[str, float], ...]

    @classmethod
    def parse(cls, text: str) -> Objective:
        """"sim_face + 0.5*edit_clip_text" -> Objective; a SelectionError says what is wrong."""
        terms: dict[str, float] = {}
        for part in text.split("+"):
            match = _TERM.match(part)
            if not match or match["metric"] not in METRICS:
                raise SelectionError(f"objective {text!r}: cannot read the term {part.strip()!r}; write terms "
                                     f"`[weight*]metric` joined by `+`, metrics: {', '.join(METRICS)}")
            terms[match["metric"]] = terms.get(match["metric"], 0.0) + float(match["weight"] or 1.0)
        if not any(terms.values()):
            raise SelectionError(f"objective {text!r} has no term with a positive weight")
        if not math.isfinite(sum(terms.values())):  # the scores are at most 1: a finite sum bounds the objective
            raise SelectionError(f"objective {text!r}: the weights overflow to {sum(terms.values())}; use weights "
                                 "of a sensible size (they only rank the validated steps)")
        return cls(tuple(terms.items()))

    def __call__(self, scores: Mapping[str, float]) -> float:
        return float(sum(weight * scores[metric] for metric, weight in self.weights))

    def without_face(self) -> Objective:
        """Every face term moved onto the CLIP image term of its split."""
        terms: dict[str, float] = {}
        for metric, weight in self.weights:
            metric = FACE_FALLBACK.get(metric, metric)
            terms[metric] = terms.get(metric, 0.0) + weight
        return Objective(tuple(terms.items()))

    def __str__(self) -> str:
        return " + ".join(metric if weight == 1 else f"{weight:g}*{metric}" for metric, weight in self.weights)


class Selection:
    """Every validated step's scores and the best one by the objective; keeps the best step's tensors on disk.

    `record` after each validation (main process), `state`/`restore` through the checkpoints, `finish`
    once at the end: it puts the chosen step's tensors back into the model and returns the record that
    personalization.json keeps.
    """

    def __init__(self, out_dir: Path, mode: str, objective: str):
        self.out_dir, self.mode = Path(out_dir), mode
        self.objective = Objective.parse(objective)
        self.scores: dict[int, dict[str, float]] = {}
        self.face_backend: str | None = None
        self.face_usable = True
        self.best: int | None = None

    @property
    def used_objective(self) -> Objective:
        return self.objective if self.face_usable else self.objective.without_face()

    def record(self, step: int, scores: Mapping[str, float], face_backend: str, face_usable: bool) -> float:
        """Keep a validated step's scores (and its tensors, if it is the best so far); returns its objective."""
        if self.face_backend is not None and (face_backend, face_usable) != (self.face_backend, self.face_usable):
            raise SelectionError(
                f"the earlier validations of {self.out_dir} were scored with face backend {self.face_backend} "
                f"({'usable' if self.face_usable else 'unusable'}), this run's is {face_backend} "
                f"({'usable' if face_usable else 'unusable'}): resume with --validation_face_backend "
                f"{self.face_backend} or pass --overwrite to start over")
        self.face_backend, self.face_usable = face_backend, face_usable
        value = self.used_objective(scores)
        self.scores[step] = {**{k: float(scores[k]) for k in METRICS}, "objective": value}
        return value

    def offer(self, step: int, model: nn.Module) -> bool:
        """After `record`: keep the step's trainable tensors when it is the best so far; True if it is."""
        if self.mode != "best" or step not in self.scores:
            return False
        if self.best is not None and self.scores[step]["objective"] <= self.scores[self.best]["objective"]:
            return False
        save_safetensors(trainable_state(model), candidate_path(self.out_dir, step))
        self.best = step
        self.prune()
        return True

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps so that a resumed run chooses as an uninterrupted one would."""
        return {"scores": {str(k): v for k, v in self.scores.items()}, "best": self.best,
                "face_backend": self.face_backend, "face_usable": self.face_usable}

    def restore(self, state: Mapping[str, Any] | None, step: int) -> None:
        """The state a checkpoint at `step` kept; its best step's tensors must still be on disk."""
        if not state:
            return
        self.scores = {int(k): dict(v) for k, v in state.get("scores", {}).items() if int(k) <= step}
        self.best, self.face_backend = state.get("best"), state.get("face_backend")
        self.face_usable = bool(state.get("face_usable", True))
        if self.best is not None and not candidate_path(self.out_dir, self.best).is_file():
            raise SelectionError(f"the checkpoint at step {step} chose step {self.best}, whose tensors "
                                 f"({candidate_path(self.out_dir, self.best)}) are gone: pass --overwrite to start "
                                 "over, or --selection last to keep the last step")
        if self.best is not None:
            try:  # read its header now: a damaged file is named at the start, not after the remaining steps
                LazySafetensors([candidate_path(self.out_dir, self.best)])
            except CheckpointError as error:
                raise SelectionError(f"the tensors of the best step so far are damaged ({error}): pass --overwrite to "
                                     "start over, or --selection last to keep the last step") from None
        self.prune()

    def prune(self) -> None:
        """Delete every candidate that is neither the best so far nor a checkpoint's recorded best."""
        keep = pinned_steps(self.out_dir) | ({self.best} if self.best is not None else set())
        for path in candidate_files(self.out_dir):
            if candidate_step(path) not in keep:
                path.unlink()

    def finish(self, model: nn.Module, last_step: int, keep_pinned: bool) -> dict[str, Any]:
        """Load the chosen step's tensors into `model` (the last step's are there already) and return the
        record for personalization.json; candidates are deleted (those checkpoints kept need, with `keep_pinned`)."""
        chosen, reason = last_step, "--selection last"
        if self.mode == "best":
            if self.best is None:
                reason = "no validated step (validation_steps 0): the last step"
            else:
                chosen, reason = self.best, f"the highest objective of {len(self.scores)} validated steps"
        if chosen != last_step:
            load_trainable(model, candidate_path(self.out_dir, chosen), "candidate adapters")
        if keep_pinned:
            self.best = None
            self.prune()
        else:
            shutil.rmtree(self.out_dir / CANDIDATE_DIR, ignore_errors=True)
        return {"mode": self.mode, "chosen_step": chosen, "reason": reason, "objective": str(self.objective),
                "objective_used": str(self.used_objective), "face_backend": self.face_backend,
                "face_usable": self.face_usable, "scores": {str(k): v for k, v in sorted(self.scores.items())}}


def pinned_steps(out_dir: Path) -> set[int]:
    """The best steps recorded in the checkpoints on disk: a resume from any of them needs its candidate."""
    pinned = set()
    for checkpoint in list_checkpoints(out_dir):
        try:
            best = json.loads((checkpoint / CHECKPOINT_STATE).read_text()).get("selection", {}).get("best")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(best, int):
            pinned.add(best)
    return pinned
