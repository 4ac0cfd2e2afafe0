"""The validation set: a fixed set of prompts and images shaped like the advanced split.

The set: `validation_sim_prompts` and `validation_edit_prompts` (written with {class_word}; the token
is put before the class word for sampling, as sample.py does, and CLIP-T is scored against the prompt
without it, as the competition scores its JSON prompts), `validation_images` images each, every image
from its own fixed generator keyed by (seed, split, prompt, image): a step's images differ from another
step's only by what training changed. libs/train/metrics.py scores them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import ml_collections
import torch
from PIL import Image

from libs.diffusion import keyed_generator
from libs.files import save_json
from libs.layout import ADVANCED_SPLITS
from libs.prompts import fill_prompt, image_name, rewrite_prompt
from libs.train_output import PROMPTS_DIR

STREAM_VALIDATION = 6  # after libs/train/batches.py's streams: the validation images' generators


@dataclass(frozen=True)
class ValidationImage:
    """One image of the set: its split, prompt index and sample index, the prompt scored and the one sampled."""

    split: str
    index: int
    idx: int
    prompt: str
    sampled: str


@dataclass
class ValidationSet:
    """The prompts of each split (as scored) and how many images each; `task` names the subject."""

    task: str
    prompts: dict[str, list[str]]
    token: str | None
    class_word: str
    images_per_prompt: int
    seed: int

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, task: str, token: str | None,
                    class_word: str) -> ValidationSet:
        cfg = config.train
        templates = {"sim": cfg.validation_sim_prompts, "edit": cfg.validation_edit_prompts}
        prompts = {split: [fill_prompt(p, None, class_word) for p in templates[split]] for split in ADVANCED_SPLITS}
        return cls(task, prompts, token, class_word, int(cfg.validation_images), int(config.seed))

    def task_name(self, split: str) -> str:
        return f"{self.task}_{split}"

    def items(self) -> list[ValidationImage]:
        return [ValidationImage(split, index, idx, prompt, rewrite_prompt(prompt, self.token, [self.class_word]))
                for split in ADVANCED_SPLITS for index, prompt in enumerate(self.prompts[split])
                for idx in range(self.images_per_prompt)]

    def generator(self, item: ValidationImage) -> torch.Generator:
        return keyed_generator(self.seed, STREAM_VALIDATION, ADVANCED_SPLITS.index(item.split), item.index, item.idx)

    def image_path(self, step_dir: Path, item: ValidationImage) -> Path:
        return step_dir / self.task_name(item.split) / image_name(item.index, item.idx)

    def write_prompt_files(self, validation_dir: Path) -> Path:
        """`prompts/<name>_sim.json` and `<name>_edit.json`: score.py's --prompts for the saved images."""
        folder = validation_dir / PROMPTS_DIR
        for split in ADVANCED_SPLITS:
            save_json(self.prompts[split], folder / f"{self.task_name(split)}.json")
        return folder


@dataclass
class Rendered:
    """One validated step's images, as decoded from the files written under `folder`."""

    step: int
    ref_dir: Path
    folder: Path
    validation_set: ValidationSet
    images: dict[str, list[list[Image.Image]]]  # split -> prompt -> images
