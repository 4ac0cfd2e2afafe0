"""One prompt file in, the competition's image files out: `{prompt_index}-{idx:03}.jpg` (three per prompt,
written atomically), a `grid.jpg` contact sheet, resumable with `skip_existing`."""
from __future__ import annotations

import io
import resource
import sys
import time
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from libs.files import save_bytes
from libs.diffusion import keyed_generator
from libs.errors import UserError
from libs.grids import image_grid
from libs.models.clip import MAX_LENGTH
from libs.photos import image_is_complete
from libs.prompts import image_name, rewrite_prompt
from libs.sample.pipeline import T2IPipeline
from libs.layout import CLASS_WORDS

GRID_FILE = "grid.jpg"
GRID_CELL = 160
JPEG_QUALITY = 95
# what a run writes into its output folder; an existing folder holding anything else is refused (libs.outputs)
OUTPUT_ENTRIES = ("[0-9]*-[0-9][0-9][0-9].jpg", GRID_FILE)


class SamplingInputError(UserError):
    """Bad user input (prompt file, output folder): reported before any file is written."""


class DiskWriteError(UserError):
    """An image could not be written (disk full, read-only, permissions): what was and was not written."""


Job = tuple[int, int]
"""(prompt index, noise index): the image's noise is keyed by (seed, prompt index, noise index)."""


def encode_jpeg(image: Image.Image) -> bytes:
    """An output image's file content (JPEG quality 95): best-of-N scores the pixels these bytes decode to."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def save_jpeg(image: Image.Image, path: Path) -> None:
    """Atomic write: an interrupted run never leaves a truncated JPEG that --skip_existing would trust."""
    save_bytes(encode_jpeg(image), path)


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


def missing_samples(num_prompts: int, output_path: Path, n_samples: int, skip_existing: bool,
                    resolution: int | None = None) -> list[tuple[int, int]]:
    """(prompt index, sample index) of every image to make, in order; all of them without `skip_existing`.

    An existing image is kept only if it decodes to the end (and has the expected size): a truncated or
    foreign file is made again, never trusted."""
    todo, redone = [], []
    for index in range(num_prompts):
        for i in range(n_samples):
            path = output_path / image_name(index, i)
            if skip_existing and path.is_file():
                if _usable(path, resolution):
                    continue
                redone.append(path.name)
            todo.append((index, i))
    if redone:
        shown = ", ".join(redone[:5]) + (f", ... ({len(redone)} in all)" if len(redone) > 5 else "")
        print(f"remaking {len(redone)} existing image(s) that do not decode or have the wrong size: {shown}")
    return todo


def _usable(path: Path, resolution: int | None) -> bool:
    if not image_is_complete(path):
        return False
    if resolution is None:
        return True
    with Image.open(path) as image:
        return image.size == (resolution, resolution)


def peak_memory() -> str:
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU (allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process RSS)"


def sample_prompts(pipeline: T2IPipeline, prompts: Sequence[str], output_path: Path, n_samples: int, seed: int,
                   skip_existing: bool = False, rewrite: bool = True) -> int:
    """Write `{prompt_index}-{idx:03}.jpg` for every prompt; returns the number of images made.

    Prompts are rewritten with the trained token before encoding; names and seeds use the original index.
    Images are denoised `config.sample.batch_size` at a time, across prompt boundaries; each image's noise
    is keyed by (seed, prompt index, sample index), so batching never changes an image.
    """
    todo = missing_samples(len(prompts), output_path, n_samples, skip_existing, pipeline.config.resolution)
    done_prompts = len(prompts) - len({index for index, _ in todo})
    if done_prompts:
        print(f"skipping {done_prompts} prompt(s) whose {n_samples} images already exist")
    if not todo:
        print("nothing to sample")
        return 0
    texts = prompt_texts(pipeline, prompts, [index for index, _ in todo], rewrite)
    made, started = 0, time.perf_counter()
    for (index, i), image in render_jobs(pipeline, texts, todo, seed):
        write_image_bytes(encode_jpeg(image), output_path / image_name(index, i), made, len(todo))
        made += 1
    seconds = time.perf_counter() - started
    write_grid(output_path, len(prompts), n_samples)
    print(f"{made} image(s) in {seconds:.1f}s ({seconds / made:.2f}s per image); peak memory: {peak_memory()}")
    return made


def prompt_texts(pipeline: T2IPipeline, prompts: Sequence[str], indices: Sequence[int],
                 rewrite: bool) -> dict[int, str]:
    """The text sampled for each prompt index (the trained token before the class word unless `rewrite` is
    off); a prompt over 77 CLIP tokens is said on stderr, since the encoder reads only the first 77."""
    personalization = pipeline.personalization
    token = personalization.modifier_token if personalization and rewrite else None
    class_words = [personalization.class_word] if personalization and personalization.class_word else CLASS_WORDS
    texts = {index: rewrite_prompt(prompts[index], token, class_words) for index in indices}
    for index, text in texts.items():
        tokens = pipeline.text_encoder.count_tokens(text)
        if tokens > MAX_LENGTH:
            print(f"warning: prompt {index} is {tokens} CLIP tokens; the text encoder reads the first {MAX_LENGTH} "
                  f"and cuts the rest: {text!r}", file=sys.stderr)
    return texts


def render_jobs(pipeline: T2IPipeline, texts: Mapping[int, str], jobs: Sequence[Job],
                seed: int) -> Iterator[tuple[Job, Image.Image]]:
    """Each job's image, in order, denoised `config.sample.batch_size` at a time across prompt boundaries, with
    a progress bar; the noise of job (index, k) comes from `keyed_generator(seed, index, k)` alone."""
    batch_size, steps = pipeline.config.sample.batch_size, pipeline.config.sample.steps
    last_job = {index: (index, k) for index, k in jobs}
    batches = [jobs[i:i + batch_size] for i in range(0, len(jobs), batch_size)]
    with tqdm(total=len(batches) * steps, desc="sampling", unit="step") as bar:
        for batch in batches:
            start_count = bar.n
            bar.set_postfix_str(f"prompt {batch[0][0]}" + (f"-{batch[-1][0]}" if batch[-1][0] != batch[0][0] else ""))

            def advance(nfe: int, _t: float, _x: Tensor, start_count: int = start_count) -> None:
                bar.update(start_count + nfe - bar.n)

            images = pipeline.generate([texts[index] for index, _ in batch],
                                       [keyed_generator(seed, index, k) for index, k in batch], callback=advance)
            for job, image in zip(batch, images):
                yield job, image
                if job == last_job[job[0]]:
                    bar.write(f"prompt {job[0]}: {texts[job[0]]!r}")


def write_image_bytes(data: bytes, path: Path, made: int, total: int) -> None:
    """An image file written atomically; a failure says how many of the run's `total` images were written."""
    try:
        save_bytes(data, path)
    except OSError as error:
        raise DiskWriteError(f"cannot write {path}: {error.strerror or error}; {made} of {total} image(s) of this run "
                             f"were written, the rest were not; free space / fix the folder, then rerun with "
                             "--skip_existing to make only the missing ones") from error


def write_grid(output_path: Path, num_prompts: int, n_samples: int) -> None:
    """grid.jpg; a failure says that only the contact sheet is missing."""
    try:
        save_grid(output_path, num_prompts, n_samples)
    except OSError as error:
        raise DiskWriteError(f"cannot write {output_path / GRID_FILE}: {error.strerror or error}; every image was "
                             "written, only the contact sheet is missing") from error
