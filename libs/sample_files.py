"""One prompt file in, the competition's image files out: `{prompt_index}-{idx:03}.jpg` (three per prompt,
written atomically), a `grid.jpg` contact sheet, resumable with `skip_existing`."""
from __future__ import annotations

import math
import resource
import time
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from libs.checkpoint import atomic_path
from libs.diffusion import keyed_generator
from libs.errors import UserError
from libs.grids import image_grid
from libs.prompts import image_name, rewrite_prompt
from libs.sampling import T2IPipeline
from libs.subjects import CLASS_WORDS

GRID_FILE = "grid.jpg"
GRID_CELL = 160
JPEG_QUALITY = 95


class SamplingInputError(UserError):
    """Bad user input (prompt file, output folder): reported before any file is written."""


def check_output_path(path: str | Path) -> Path:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SamplingInputError(f"output path {path} is a file, not a folder")
    return path


def save_jpeg(image: Image.Image, path: Path) -> None:
    """Atomic write: an interrupted run never leaves a truncated JPEG that --skip_existing would trust."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="JPEG", quality=JPEG_QUALITY)


def save_grid(output_path: Path, num_prompts: int, n_samples: int, cell: int = GRID_CELL) -> Path:
    """`grid.jpg`: one row per prompt (labelled with its index), one column per sample."""
    rows = [[_thumbnail(output_path / image_name(row, column), cell) for column in range(n_samples)]
            for row in range(num_prompts)]
    save_jpeg(image_grid(rows, cell, labels=[str(i) for i in range(num_prompts)]), output_path / GRID_FILE)
    return output_path / GRID_FILE


def _thumbnail(path: Path, cell: int) -> Image.Image | None:
    if not path.is_file():
        return None
    with Image.open(path) as image:
        return image.convert("RGB").resize((cell, cell), Image.BICUBIC)


def missing_samples(num_prompts: int, output_path: Path, n_samples: int, skip_existing: bool) -> list[tuple[int, list[int]]]:
    """(prompt index, sample indices to make) for every prompt with work left; all of them without skip_existing."""
    todo = []
    for index in range(num_prompts):
        missing = [i for i in range(n_samples) if not (skip_existing and (output_path / image_name(index, i)).is_file())]
        if missing:
            todo.append((index, missing))
    return todo


def peak_memory() -> str:
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU (allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process RSS)"


def sample_prompts(pipeline: T2IPipeline, prompts: Sequence[str], output_path: Path, n_samples: int, seed: int,
                   skip_existing: bool = False, rewrite: bool = True) -> int:
    """Write `{prompt_index}-{idx:03}.jpg` for every prompt; returns the number of images made.

    Prompts are rewritten with the trained token before encoding; names and seeds use the original index.
    """
    personalization = pipeline.personalization
    token = personalization.modifier_token if personalization and rewrite else None
    class_words = [personalization.class_word] if personalization and personalization.class_word else CLASS_WORDS
    batch_size = pipeline.config.sample.batch_size
    todo = missing_samples(len(prompts), output_path, n_samples, skip_existing)
    if len(todo) < len(prompts):
        print(f"skipping {len(prompts) - len(todo)} prompt(s) whose {n_samples} images already exist")
    if not todo:
        print("nothing to sample")
        return 0

    batches = sum(math.ceil(len(missing) / batch_size) for _, missing in todo)
    made = 0
    with tqdm(total=batches * pipeline.config.sample.steps, desc="sampling", unit="step") as bar:
        for index, missing in todo:
            started = time.perf_counter()
            prompt = rewrite_prompt(prompts[index], token, class_words)
            bar.set_postfix_str(f"prompt {index}")
            for first in range(0, len(missing), batch_size):
                sample_indices = missing[first:first + batch_size]
                start_count = bar.n

                def advance(nfe: int, _t: float, _x: Tensor, start_count: int = start_count) -> None:
                    bar.update(start_count + nfe - bar.n)

                generators = [keyed_generator(seed, index, i) for i in sample_indices]
                images = pipeline.generate([prompt] * len(sample_indices), generators, callback=advance)
                for i, image in zip(sample_indices, images):
                    save_jpeg(image, output_path / image_name(index, i))
                made += len(images)
            bar.write(f"prompt {index}: {time.perf_counter() - started:.1f}s  {prompt!r}")
    save_grid(output_path, len(prompts), n_samples)
    print(f"peak memory: {peak_memory()}")
    return made
