"""Photos on disk, one rule each: which files are images, how an image is read (upright, RGB, transparent
pixels over white), and the `crops.json` record that the cropping step writes beside its crops.

Preprocessing, training and scoring all read photos through here, so a `.webp` or a sideways phone
portrait is treated the same way by every step.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from PIL import Image, ImageOps, UnidentifiedImageError

from libs.files import save_json
from libs.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
CROPS_FILE = "crops.json"  # written by tools/crop.py beside the crops; face boxes in the crops' pixels
MASKS_FOLDER = "masks"  # person masks beside the crops, in a subfolder so no photo listing sees them

UNREADABLE = (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, ValueError)
"""What PIL raises for a file that is not a whole, decodable image."""

Box = tuple[float, float, float, float]
"""x0, y0, x1, y1 in pixels."""


class PhotoError(UserError):
    """A photo folder or image is missing, empty, unreadable or too small; the message names the file."""


def is_image_file(path: Path) -> bool:
    """A visible regular file with an image extension (any case)."""
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: str | Path, what: str = "photo") -> list[Path]:
    """Image files of a flat folder, sorted by name; other files are ignored, but an empty result is an error."""
    folder = Path(folder)
    if not folder.exists():
        raise PhotoError(f"{what} folder not found: {folder}")
    if not folder.is_dir():
        raise PhotoError(f"{what} folder {folder} is a file, not a folder")
    try:
        entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as error:
        raise PhotoError(f"cannot list {what} folder {folder}: {error.strerror or error}") from error
    images = [p for p in entries if is_image_file(p)]
    if not images:
        others = ", ".join(p.name for p in entries[:6]) + (" ..." if len(entries) > 6 else "")
        found = f" (it holds only: {others})" if entries else " (it is empty)"
        raise PhotoError(f"no {what}s ({', '.join(IMAGE_EXTENSIONS)}) in {folder}{found}")
    return images


def open_image(path: str | Path, min_side: int = 1) -> Image.Image:
    """Upright RGB pixels of an image file (EXIF orientation applied, the whole file decoded);
    transparent pixels become white (background-removed PNGs)."""
    path = Path(path)
    try:
        with Image.open(path) as raw:
            raw.load()
            image = ImageOps.exif_transpose(raw)
    except UNREADABLE as error:
        raise PhotoError(f"cannot read image {path}: {error}") from error
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert("RGB")
    if min(image.size) < min_side:
        raise PhotoError(f"image {path} is too small ({image.size[0]}x{image.size[1]}); "
                         f"its short side must be at least {min_side} pixels")
    return image


def image_is_complete(path: str | Path) -> bool:
    """True when the file decodes to the end (a truncated or half-written JPEG does not)."""
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except UNREADABLE:
        return False


# --- crops.json -----------------------------------------------------------------------------------
# {"settings": {...how the crops were made...},
#  "photos": {"<source photo name>": {"output": "<crop file name>" | null, "status": "face" | "center" |
#             "skipped" | "error", "face_box": [x0, y0, x1, y1] in the crop's pixels | null,
#             "source_face_box": [...] in the photo's pixels | null, "crop_box": [...] in the photo's pixels,
#             "mask": "masks/<crop stem>.png" | null, ... detection details ...}}}
# A mask (written when the background was removed) is the person mask of its crop: 8-bit grayscale, the crop's
# size, 255 = person, 0 = background and the part of the crop box outside the photo; the alpha the crop's
# background colour was composited with.


def write_crops_record(folder: Path, settings: dict[str, Any], photos: dict[str, dict[str, Any]]) -> None:
    """Write `crops.json` atomically (the settings that made the crops and one entry per source photo)."""
    save_json({"settings": settings, "photos": photos}, folder / CROPS_FILE)


def read_crops_record(folder: Path) -> dict[str, Any] | None:
    """The parsed `crops.json` of a folder, None when there is none or it is not the expected shape."""
    path = Path(folder) / CROPS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("photos"), dict):
        return None
    return data


def _crop_entries(folder: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(crop file name, its entry) for every entry of the folder's `crops.json` whose crop exists."""
    for entry in (read_crops_record(folder) or {}).get("photos", {}).values():
        if isinstance(entry, dict) and isinstance(entry.get("output"), str) and (folder / entry["output"]).is_file():
            yield entry["output"], entry


def face_boxes(folder: str | Path) -> dict[str, Box]:
    """{crop file name: face box in that file's pixels} from the folder's `crops.json` (empty without one)."""
    return {output: tuple(float(v) for v in entry["face_box"]) for output, entry in _crop_entries(Path(folder))
            if isinstance(entry.get("face_box"), list) and len(entry["face_box"]) == 4}


def person_masks(folder: str | Path) -> dict[str, Path]:
    """{crop file name: its person mask} from the folder's `crops.json`, for crops and masks that exist
    (empty without background removal or without a `crops.json`)."""
    folder = Path(folder)
    return {output: folder / entry["mask"] for output, entry in _crop_entries(folder)
            if isinstance(entry.get("mask"), str) and (folder / entry["mask"]).is_file()}
