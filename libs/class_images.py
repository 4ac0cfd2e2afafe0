"""Class image sets for prior preservation: real CelebA faces or images rendered by the base model.

    python -m libs.class_images celeba --celeba_dir DIR [--class_word boy girl] [-n 200] [--seed 0]
    python -m libs.class_images generate [--class_word boy girl] [-n 200] [--seed 0] [--config unidiffuser_v1]

Both write `<out_dir>/<class_word>/` in the layout the reference entry trained with:
`images/` (the pictures), `images.txt` (one file name per line, relative to images/), `caption.txt`
(the caption of the same line's image) plus `class_set.json` saying how the set was made.
`load_class_set` is what training reads.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from libs.checkpoint import CheckpointError, atomic_path, save_json

IMAGES_DIR = "images"
IMAGES_LIST = "images.txt"
CAPTIONS = "caption.txt"
INFO = "class_set.json"
DEFAULT_CAPTION = "a photo of a {}"
DEFAULT_COUNT = 200
DEFAULT_OUT_DIR = "class_data"
# CelebA's `Male` attribute: 1 for men, -1 for women
MALE_VALUE = {"boy": 1, "man": 1, "male": 1, "girl": -1, "woman": -1, "female": -1}
MAKE_HINT = "make one with `python -m libs.class_images celeba ...` or `python -m libs.class_images generate ...`"
JPEG_QUALITY = 95


class ClassSetError(ValueError):
    """A class image set (or the CelebA folder it comes from) is missing, inconsistent or too small."""


# --- reading a class set (training) --------------------------------------------------------------

def load_class_set(class_dir: str | Path) -> list[tuple[Path, str]]:
    """(image path, caption) pairs of a class set, checked so training fails now and not at step 300."""
    class_dir = Path(class_dir)
    if not class_dir.is_dir():
        raise ClassSetError(f"class image folder not found: {class_dir}\n  -> {MAKE_HINT}")
    names = _read_lines(class_dir / IMAGES_LIST)
    captions = _read_lines(class_dir / CAPTIONS)
    if len(names) != len(captions):
        raise ClassSetError(
            f"{class_dir / IMAGES_LIST} has {len(names)} lines but {class_dir / CAPTIONS} has {len(captions)}: "
            "they must be aligned line by line (one caption per image)"
        )
    if not names:
        raise ClassSetError(f"{class_dir / IMAGES_LIST} lists no images\n  -> {MAKE_HINT}")
    image_dir = class_dir / IMAGES_DIR
    pairs = [(image_dir / name, caption) for name, caption in zip(names, captions)]
    missing = [str(path) for path, _ in pairs if not path.is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
        raise ClassSetError(f"{len(missing)} image(s) listed in {class_dir / IMAGES_LIST} do not exist: {shown}")
    return pairs


def _read_lines(path: Path) -> list[str]:
    """Non-empty lines; trailing blank lines are fine, a blank line in the middle would shift the alignment."""
    if not path.is_file():
        raise ClassSetError(f"{path} not found\n  -> {MAKE_HINT}")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    blank = [number for number, line in enumerate(lines, start=1) if not line]
    if blank:
        raise ClassSetError(f"{path}: line {blank[0]} is empty (every line must name an image / hold a caption)")
    return lines


def write_class_set(class_dir: Path, names: Sequence[str], captions: Sequence[str], info: dict[str, Any]) -> None:
    """Write images.txt, caption.txt and class_set.json (atomically) for files already in images/."""
    if len(names) != len(captions):
        raise ValueError(f"{len(names)} names but {len(captions)} captions")
    with atomic_path(class_dir / IMAGES_LIST) as tmp:
        tmp.write_text("".join(f"{name}\n" for name in names), encoding="utf-8")
    with atomic_path(class_dir / CAPTIONS) as tmp:
        tmp.write_text("".join(f"{caption}\n" for caption in captions), encoding="utf-8")
    save_json(info, class_dir / INFO)


def caption_for(template: str, class_word: str) -> str:
    """`a photo of a {}` -> `a photo of a boy`; a template without `{}` is used as it is."""
    return template.format(class_word) if "{}" in template else template


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
    old_names = set(_read_lines(class_dir / IMAGES_LIST)) if (class_dir / IMAGES_LIST).is_file() else set()
    chosen: list[str] = []
    with tqdm(total=n, desc=f"celeba {class_word}", unit="img") as progress:
        for name in order:
            if len(chosen) == n:
                break
            if not _decodes(image_dir / name):
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


def _decodes(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
        return False


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
    `pipeline` (a `libs.sampling.T2IPipeline`) lets several sets share one loaded model; without it the
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
        from libs.sampling import load_pipeline

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


# --- command line --------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m libs.class_images", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--class_word", nargs="+", default=["boy", "girl"], help="one set per word (default: boy girl)")
    common.add_argument("-n", "--num_images", type=int, default=DEFAULT_COUNT, help="images per class (default %(default)s)")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("-o", "--out_dir", default=DEFAULT_OUT_DIR, help="sets go to OUT_DIR/<class_word>/")
    common.add_argument("--caption", default=DEFAULT_CAPTION,
                        help="caption template, {} = class word (default %(default)r); also the prompt for generate")
    celeba = commands.add_parser("celeba", parents=[common], help="pick real faces from a CelebA download")
    celeba.add_argument("--celeba_dir", required=True, help="folder with img_align_celeba/ and list_attr_celeba.txt")
    generate = commands.add_parser("generate", parents=[common], help="render class images with the base UniDiffuser")
    generate.add_argument("--config", default="unidiffuser_v1")
    generate.add_argument("--steps", type=int, default=None, help="sampling steps (default: the config's)")
    generate.add_argument("--scale", type=float, default=None, help="guidance scale (default: the config's)")
    generate.add_argument("--batch_size", type=int, default=4)
    generate.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_images < 1:
        print("error: --num_images must be at least 1", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir)
    try:
        if args.command == "celeba":
            sets = {word: import_celeba(args.celeba_dir, out_dir / word, word, args.num_images, args.seed, args.caption)
                    for word in args.class_word}
        else:
            config, device = _generation_setup(args)
            pipeline = None
            sets = {}
            for word in args.class_word:
                if pipeline is None and missing_indices(out_dir / word, args.num_images):
                    from libs.sampling import load_pipeline

                    pipeline = load_pipeline(config, device)  # once for all class words
                sets[word] = generate_class_images(config, out_dir / word, word, args.num_images, args.seed,
                                                   args.caption, device, args.batch_size, pipeline)
    except (ClassSetError, CheckpointError, FileNotFoundError) as error:  # bad data, missing weights or config
        print(f"error: {error}", file=sys.stderr)
        return 1
    for word, pairs in sets.items():
        print(f"{word}: {len(pairs)} images in {out_dir / word / IMAGES_DIR}, captions like {pairs[0][1]!r}")
    return 0


def _generation_setup(args: argparse.Namespace) -> tuple[Any, str]:
    import torch

    from libs.config import apply_overrides, load_config

    config = apply_overrides(load_config(args.config), {"sample.steps": args.steps, "sample.scale": args.scale})
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return config, device


if __name__ == "__main__":
    sys.exit(main())
