"""Making class image sets for prior preservation: real CelebA faces, or images rendered by the base model.
Both write the layout of libs/class_images/folder.py; the command line is tools/class_images.py."""
from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

from tqdm import tqdm

from libs.files import atomic_path, save_json
from libs.class_images.folder import (CAPTIONS, IMAGES_DIR, IMAGES_LIST, INFO, ClassSetError, caption_for,
                                     load_class_set, read_lines, write_class_set)
from libs.outputs import check_output_folder, each, only
from libs.photos import image_is_complete

DEFAULT_CAPTION = "a photo of a {}"
DEFAULT_COUNT = 200
DEFAULT_OUT_DIR = "class_data"
# CelebA's `Male` attribute: 1 for men, -1 for women
MALE_VALUE = {"boy": 1, "man": 1, "male": 1, "girl": -1, "woman": -1, "female": -1}
JPEG_QUALITY = 95


def male_value(class_word: str) -> int:
    try:
        return MALE_VALUE[class_word.lower()]
    except KeyError:
        raise ClassSetError(f"class word {class_word!r} has no CelebA gender; use one of {', '.join(MALE_VALUE)}") from None


# --- CelebA --------------------------------------------------------------------------------------

def find_celeba_files(celeba_dir: str | Path) -> tuple[Path, Path]:
    """(image folder, attribute file) in the official (Anno/, Img/) or the Kaggle (csv, nested) layout."""
    root = Path(celeba_dir)
    if not root.is_dir():
        raise ClassSetError(f"CelebA folder not found: {root}")
    attr_candidates = [root / "list_attr_celeba.txt", root / "Anno" / "list_attr_celeba.txt", root / "list_attr_celeba.csv"]
    image_candidates = [root / "img_align_celeba" / "img_align_celeba", root / "img_align_celeba",
                        root / "Img" / "img_align_celeba"]
    attr_file = next((p for p in attr_candidates if p.is_file()), None)
    image_dir = next((p for p in image_candidates if p.is_dir() and any(p.glob("*.jpg"))), None)
    if attr_file is None or image_dir is None:
        looked = attr_candidates if attr_file is None else image_candidates
        what = "attribute file" if attr_file is None else "folder of aligned .jpg images"
        raise ClassSetError(f"no CelebA {what} in {root}; looked for: " + ", ".join(str(p) for p in looked))
    return image_dir, attr_file


def read_celeba_attribute(attr_file: str | Path, attribute: str = "Male") -> dict[str, int]:
    """{image file name: attribute value (1 / -1)} from list_attr_celeba.txt (or Kaggle's .csv)."""
    attr_file = Path(attr_file)
    text = attr_file.read_text(encoding="utf-8")
    if attr_file.suffix.lower() == ".csv":
        rows = list(csv.reader(text.splitlines()))
        header, body = rows[0][1:], rows[1:]
    else:
        lines = text.splitlines()
        if len(lines) < 2:
            raise ClassSetError(f"{attr_file} is too short to be list_attr_celeba.txt (count line, names line, rows)")
        header, body = lines[1].split(), [line.split() for line in lines[2:]]
    if attribute not in header:
        raise ClassSetError(f"{attr_file} has no {attribute!r} column (columns: {' '.join(header[:8])} ...)")
    column = header.index(attribute) + 1
    values: dict[str, int] = {}
    for number, row in enumerate(body, start=3):
        if not row:
            continue
        if len(row) != len(header) + 1:
            raise ClassSetError(f"{attr_file} row {number}: {len(row) - 1} values for {len(header)} attributes")
        try:
            values[row[0]] = int(row[column])
        except ValueError:
            raise ClassSetError(f"{attr_file} row {number}: {attribute} value {row[column]!r} is not an integer") from None
    return values


def import_celeba(celeba_dir: str | Path, class_dir: str | Path, class_word: str, n: int = DEFAULT_COUNT,
                  seed: int = 0, caption: str = DEFAULT_CAPTION) -> list[tuple[Path, str]]:
    """Copy `n` seeded-random CelebA faces of the class word's gender into a class set.

    Images that do not decode are reported and replaced by the next ones of the same shuffle,
    so the set is the same for the same seed and always has `n` usable pictures.
    """
    image_dir, attr_file = find_celeba_files(celeba_dir)
    want = male_value(class_word)
    values = read_celeba_attribute(attr_file)
    present = {p.name for p in image_dir.iterdir()}
    candidates = sorted(name for name, value in values.items() if value == want and name in present)
    if len(candidates) < n:
        raise ClassSetError(
            f"asked for {n} {class_word} images but {image_dir} holds only {len(candidates)} with Male={want} "
            f"({len(values)} rows in {attr_file})"
        )
    order = random.Random(seed).sample(candidates, len(candidates))
    class_dir = Path(class_dir)
    out_images = class_dir / IMAGES_DIR
    old_names = set(read_lines(class_dir / IMAGES_LIST)) if (class_dir / IMAGES_LIST).is_file() else set()
    chosen: list[str] = []
    with tqdm(total=n, desc=f"celeba {class_word}", unit="img") as progress:
        for name in order:
            if len(chosen) == n:
                break
            if not image_is_complete(image_dir / name):
                tqdm.write(f"skipping unreadable CelebA image {image_dir / name}")
                continue
            _copy(image_dir / name, out_images / name)
            chosen.append(name)
            progress.update(1)
    if len(chosen) < n:
        raise ClassSetError(f"only {len(chosen)} of the {n} requested {class_word} images in {image_dir} are readable")
    _remove_unlisted(out_images, old_names - set(chosen))
    text = caption_for(caption, class_word)
    info = {"source": "celeba", "celeba_dir": str(Path(celeba_dir).resolve()), "class_word": class_word,
            "attribute": "Male", "value": want, "n": n, "seed": seed, "caption": text}
    write_class_set(class_dir, chosen, [text] * n, info)
    return load_class_set(class_dir)


def check_class_output(out_dir: str | Path, class_words: Sequence[str]) -> None:
    """Before any image is read or rendered: `out_dir` and each `out_dir/<word>` can take a class set, and hold
    nothing but class sets (libs.outputs)."""
    ours = only(IMAGES_DIR, IMAGES_LIST, CAPTIONS, INFO)
    check_output_folder(out_dir, "class image folder (-o)", each(ours))
    for word in class_words:
        check_output_folder(Path(out_dir) / word, "class set folder", ours)


def _copy(source: Path, target: Path) -> None:
    if target.is_file() and target.stat().st_size == source.stat().st_size:
        return
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def _remove_unlisted(image_dir: Path, names: Iterable[str]) -> None:
    """Files an earlier selection listed that the new one does not use (never other files)."""
    for name in names:
        (image_dir / name).unlink(missing_ok=True)


# --- generated with the base model ---------------------------------------------------------------

def generation_info(config: Any, class_word: str, prompt: str, seed: int) -> dict[str, Any]:
    """Everything that changes the generated pixels; a resumed run must match it."""
    sample = config.sample
    return {"source": "generate", "class_word": class_word, "prompt": prompt, "seed": seed,
            "config": config.name, "steps": sample.steps, "scale": sample.scale,
            "cfg_mode": sample.get("cfg_mode")}


def missing_indices(class_dir: str | Path, n: int) -> list[int]:
    """Indices 0..n-1 whose generated image is not on disk yet."""
    image_dir = Path(class_dir) / IMAGES_DIR
    return [index for index in range(n) if not (image_dir / generated_name(index)).is_file()]


def generated_name(index: int) -> str:
    return f"{index:05d}.jpg"


def generate_class_images(config: Any, class_dir: str | Path, class_word: str, n: int = DEFAULT_COUNT,
                          seed: int = 0, caption: str = DEFAULT_CAPTION, device: str = "cpu",
                          batch_size: int = 4, pipeline: Any = None) -> list[tuple[Path, str]]:
    """Render `n` class images with the base UniDiffuser; image i uses seed `seed + i`.

    Resumable: images already on disk are kept, so an interrupted run continues where it stopped.
    A folder made with another prompt, seed or sampler setting is refused rather than mixed.
    `pipeline` (a `libs.sample.pipeline.T2IPipeline`) lets several sets share one loaded model; without it the
    base model is loaded here, and only if an image is missing.
    """
    class_dir = Path(class_dir)
    prompt = caption_for(caption, class_word)
    info = generation_info(config, class_word, prompt, seed)
    _check_resumable(class_dir, info)
    save_json({**info, "n": n}, class_dir / INFO)
    todo = missing_indices(class_dir, n)
    if len(todo) < n:
        print(f"{class_dir}: {n - len(todo)} of {n} images already there, generating {len(todo)}")
    if todo and pipeline is None:
        from libs.sample.pipeline import load_pipeline

        pipeline = load_pipeline(config, device)
    with tqdm(total=len(todo), desc=f"generate {class_word}", unit="img") as progress:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            images = pipeline.generate_images([prompt] * len(batch), [seed + index for index in batch], batch_size)
            for index, image in zip(batch, images):
                with atomic_path(class_dir / IMAGES_DIR / generated_name(index)) as tmp:
                    image.convert("RGB").save(tmp, format="JPEG", quality=JPEG_QUALITY)
            progress.update(len(batch))
    write_class_set(class_dir, [generated_name(index) for index in range(n)], [prompt] * n, {**info, "n": n})
    return load_class_set(class_dir)


def _check_resumable(class_dir: Path, info: dict[str, Any]) -> None:
    path = class_dir / INFO
    if not path.is_file():
        return
    try:
        previous = json.loads(path.read_text())
    except ValueError:
        raise ClassSetError(f"{path} is not valid JSON; delete {class_dir} to start over") from None
    differing = {key: (previous.get(key), value) for key, value in info.items() if previous.get(key) != value}
    if differing:
        shown = ", ".join(f"{key}: {old!r} there, {new!r} now" for key, (old, new) in differing.items())
        raise ClassSetError(f"{class_dir} holds a class set made differently ({shown}); "
                            "use another --out_dir or delete the folder")
