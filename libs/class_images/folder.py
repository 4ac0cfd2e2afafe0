"""The class-image set that prior preservation trains with, in the reference entry's layout:

    <class_dir>/images/        the pictures
    <class_dir>/images.txt     one file name per line, relative to images/
    <class_dir>/caption.txt    the caption of the same line's image
    <class_dir>/class_set.json how the set was made

Reading and writing the layout lives here; making a set (CelebA, generation) is libs/class_images/sources.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from libs.files import atomic_path, save_json
from libs.errors import UserError

IMAGES_DIR = "images"
IMAGES_LIST = "images.txt"
CAPTIONS = "caption.txt"
INFO = "class_set.json"
MAKE_HINT = "make one with `python tools/class_images.py celeba ...` or `python tools/class_images.py generate ...`"


class ClassSetError(UserError):
    """A class image set (or the CelebA folder it comes from) is missing, inconsistent or too small."""


def load_class_set(class_dir: str | Path) -> list[tuple[Path, str]]:
    """(image path, caption) pairs of a class set, checked so training fails now and not at step 300."""
    class_dir = Path(class_dir)
    if not class_dir.is_dir():
        raise ClassSetError(f"class image folder not found: {class_dir}\n  -> {MAKE_HINT}")
    names = read_lines(class_dir / IMAGES_LIST)
    captions = read_lines(class_dir / CAPTIONS)
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


def read_lines(path: Path) -> list[str]:
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
