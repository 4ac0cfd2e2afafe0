"""The competition's layout (spec §1-§3, §8): the subjects, their class words, the two evaluation splits
and, per subject and split, the prompt file, the output folder, the reference photos and the trained
personalization. sample.py --all, score.py, train.sh, the submission tool (and through sample.sh and
score.py the grader dry run) all take their paths from here.

    eval_prompts/<name>.json                      -> outputs/<name>/               (preliminary split)
    eval_prompts_advance/<name>_{sim,edit}.json   -> outputs/<name>_{sim,edit}/    (advanced split)
    train_data/<name>/ (train_data_crop/<name>/)  the reference photos (what train.sh trains on)
    model_output/<name>/                          the personalization train.py writes
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

SUBJECTS = ("boy1", "boy2", "girl1", "girl2")
"""In the order train.sh and sample.sh run them."""
CLASS_WORDS = ("boy", "girl")
PRELIMINARY = "preliminary"
ADVANCED = "advanced"
SPLITS = (PRELIMINARY, ADVANCED)
"""The competition's two evaluations, in the order score.py reports them (the graded advanced one last)."""
ADVANCED_SPLITS = ("sim", "edit")
"""The advanced evaluation's prompt files: eval_prompts_advance/<name>_sim.json and <name>_edit.json."""
PROMPT_ROOTS = {PRELIMINARY: "eval_prompts", ADVANCED: "eval_prompts_advance"}
"""Where each split's prompt files live (spec §2)."""
DEFAULT_PROMPT_ROOTS = {split: f"./{folder}/" for split, folder in PROMPT_ROOTS.items()}
"""score.py with no --prompts looks in both splits' folders, as the command line spells them."""
OUTPUTS = "outputs"
TRAIN_DATA = "train_data"
TRAIN_DATA_CROP = "train_data_crop"
MODEL_OUTPUT = "model_output"


def class_word_from_path(path: str | Path) -> str:
    """The competition rule: "boy" if the data path contains "boy", else "girl"."""
    text = f"{path} {Path(path).resolve().name}".lower()
    return "boy" if "boy" in text else "girl"


def task_names(subject: str, split: str) -> list[str]:
    """A subject's task names in a split: `boy1`, or `boy1_sim` and `boy1_edit`."""
    return [f"{subject}_{part}" for part in ADVANCED_SPLITS] if split == ADVANCED else [subject]


@dataclass(frozen=True)
class Task:
    """One (subject, prompt file) cell of the layout with every path that belongs to it."""

    subject: str
    split: str
    name: str
    prompt_file: Path
    output_dir: Path
    photo_dir: Path
    model_dir: Path

    def missing(self, *parts: str) -> list[Path]:
        """The named parts (`prompt_file`, `output_dir`, `photo_dir`, `model_dir`) that are not on disk: the one
        rule for "does this run exist" that sampling and scoring share (a `*_file` must be a file, a `*_dir` a
        folder)."""
        paths = [(part, getattr(self, part)) for part in parts]
        return [path for part, path in paths if not (path.is_file() if part.endswith("_file") else path.is_dir())]


PART_LABELS = {"prompt_file": "prompt file", "output_dir": "generated images folder",
               "photo_dir": "reference photo folder", "model_dir": "trained personalization"}
"""What each part of a Task is called in messages."""


def split_tasks(split: str, subjects: Sequence[str] = SUBJECTS, prompts_dir: str | Path | None = None,
                outputs: str | Path = OUTPUTS, photos: str | Path = TRAIN_DATA, models: str | Path = MODEL_OUTPUT,
                root: str | Path = ".") -> list[Task]:
    """Every task of one split, subject by subject; relative folders are taken under `root`."""
    root = Path(root)
    prompts = root / (prompts_dir if prompts_dir is not None else PROMPT_ROOTS[split])
    return [Task(subject, split, name, prompts / f"{name}.json", root / outputs / name, root / photos / subject,
                 root / models / subject)
            for subject in subjects for name in task_names(subject, split)]


def tasks_with(needs: Sequence[str], splits: Sequence[str] = SPLITS, subjects: Sequence[str] = SUBJECTS,
               **folders: str | Path) -> tuple[list[Task], list[Task]]:
    """(the tasks whose `needs` parts all exist, the others), subject by subject and within a subject split by
    split; `folders` are split_tasks's (prompts_dir, outputs, photos, models, root)."""
    tasks = [task for subject in subjects for split in splits for task in split_tasks(split, [subject], **folders)]
    return [t for t in tasks if not t.missing(*needs)], [t for t in tasks if t.missing(*needs)]


def training_photos(subject: str, root: str | Path = ".") -> Path:
    """The photos train.sh trains a subject on: the cropped ones when tools/crop.py made them."""
    cropped = Path(root) / TRAIN_DATA_CROP / subject
    return cropped if cropped.is_dir() else Path(root) / TRAIN_DATA / subject


def model_dir(subject: str, root: str | Path = ".") -> Path:
    """`model_output/<name>`: where train.sh writes a subject's personalization and sample.py reads it."""
    return Path(root) / MODEL_OUTPUT / subject


def training_runs(root: str | Path = ".") -> list[str]:
    """train.sh's plan, one `name:class_word:photos:output` line per subject (paths relative to `root`)."""
    return [f"{name}:{class_word_from_path(name)}:{training_photos(name, root)}:{model_dir(name, root)}"
            for name in SUBJECTS]
