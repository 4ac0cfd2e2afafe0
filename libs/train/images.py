"""Training images: subject photos and class images -> square training crops.

Photos are read upright (EXIF orientation), as RGB (transparent pixels over white), resized so the short
side is the training resolution (aspect ratio kept, never squashed) and cropped to a square: around the
face when a face box is known (the data-preparation step's `crops.json`, or a face detector), else in the
centre. A horizontal flip is a second cached *view* of the same image, not a per-step transform
(libs/train/encodings.py encodes every view once). Photos are read only through libs.photos, class
sets only through libs.class_images.folder.

With `masks`, a photo's person mask (the cropping step's `masks/<stem>.png`, libs.photos.person_masks)
gets exactly the framing of its photo, resized bilinearly (never LANCZOS: it would ring past [0, 255]).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from libs.class_images.folder import MAKE_HINT, ClassSetError, load_class_set
from libs.config import KEY_CHOICES
from libs.errors import UserError
from libs.photos import UNREADABLE, Box, PhotoError, face_boxes, list_images, open_image, person_masks

CROP_MODES = KEY_CHOICES["train.crop"]


@dataclass(frozen=True)
class TrainImage:
    """One prepared square training image and where it came from."""

    path: Path
    image: Image.Image  # RGB, resolution x resolution
    crop: str  # how it was framed: "face (crops.json)", "face (<detector>)", "center (<why>)" or "center"
    caption: str | None = None  # the class set's caption (class images only)
    mask: Image.Image | None = None  # L, resolution x resolution, 255 = person (instance photos with a mask)

    def views(self, hflip: bool) -> list[Image.Image]:
        """The image and, with `hflip`, its mirror: the cached augmentations."""
        return [self.image, ImageOps.mirror(self.image)] if hflip else [self.image]

    def mask_views(self, hflip: bool) -> list[Image.Image] | None:
        """The person mask of each view (flipped with it), None without a mask."""
        if self.mask is None:
            return None
        return [self.mask, ImageOps.mirror(self.mask)] if hflip else [self.mask]


# --- framing -------------------------------------------------------------------------------------


class FaceDetector:
    """libs.face's detector (insightface, else dlib), built on first use; `unavailable` says why not."""

    def __init__(self) -> None:
        self._backend = None
        self.unavailable: str | None = None

    @property
    def name(self) -> str:
        return getattr(self._backend, "name", "none")

    def face_box(self, image: Image.Image) -> Box | None:
        """The primary face's box (libs.face's one rule), or None."""
        if self._backend is None and self.unavailable is None:
            try:
                from libs.face import get_face_backend

                self._backend = get_face_backend("auto")
            except (ImportError, UserError, RuntimeError) as error:
                self.unavailable = str(error).splitlines()[0]
        if self._backend is None:
            return None
        face = self._backend.primary_face(np.asarray(image))
        return face.bbox if face is not None else None


def square_crop(image: Image.Image, resolution: int, face_box: Box | None = None,
                resample: int = Image.LANCZOS) -> Image.Image:
    """Resize the short side to `resolution` (aspect ratio kept), then cut the square: centred on the
    face along the long side when a face box is given (slid to stay inside), else centred. The framing
    depends only on the size and the box, so a mask cut with the same arguments lines up with its photo."""
    new_w, new_h, left, top = _square_window(image.size, resolution, face_box)
    resized = image.resize((new_w, new_h), resample) if (new_w, new_h) != image.size else image
    return resized.crop((left, top, left + resolution, top + resolution))


def training_square(size: tuple[int, int], resolution: int, face_box: Box | None = None) -> Box:
    """The square `square_crop` cuts, in the photo's own pixels (what the reports draw on a photo)."""
    new_w, new_h, left, top = _square_window(size, resolution, face_box)
    sx, sy = size[0] / new_w, size[1] / new_h
    return (left * sx, top * sy, (left + resolution) * sx, (top + resolution) * sy)


def _square_window(size: tuple[int, int], resolution: int, face_box: Box | None) -> tuple[int, int, int, int]:
    """(resized width, resized height, left, top) of the training square: short side to `resolution`."""
    width, height = size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    left, top = (new_w - resolution) / 2, (new_h - resolution) / 2
    if face_box is not None:
        cx = (face_box[0] + face_box[2]) / 2 * new_w / width
        cy = (face_box[1] + face_box[3]) / 2 * new_h / height
        left = min(max(cx - resolution / 2, 0), new_w - resolution)
        top = min(max(cy - resolution / 2, 0), new_h - resolution)
    return new_w, new_h, round(left), round(top)


def load_instance_images(folder: str | Path, resolution: int, crop: str = "face",
                         min_side: int = 128, masks: bool = False) -> list[TrainImage]:
    """Every photo of the subject folder, framed for training.

    crop "face": the square is centred on the face box from crops.json, else on a detected face, else
    on the image (each image's `crop` says which and why); "center": always on the image.
    `masks`: each photo's person mask, framed the same way (None for photos without one).
    """
    if crop not in CROP_MODES:
        raise PhotoError(f"crop mode {crop!r} not in {CROP_MODES}")
    paths = list_images(folder)
    mask_files = person_masks(folder) if masks else {}
    boxes = face_boxes(folder) if crop == "face" else {}
    detector = FaceDetector()
    images = []
    for path in paths:
        image = open_image(path, min_side)
        box, how = boxes.get(path.name), "face (crops.json)"
        if box is None and crop == "face":
            box, how = detector.face_box(image), f"face ({detector.name})"
            if box is None:
                why = f"no face detector: {detector.unavailable}" if detector.unavailable else "no face found"
                how = f"center ({why})"
        if box is None and crop == "center":
            how = "center"
        mask = _read_mask(mask_files[path.name], image.size) if path.name in mask_files else None
        images.append(TrainImage(path, square_crop(image, resolution, box), how,
                                 mask=square_crop(mask, resolution, box, Image.BILINEAR) if mask else None))
    return images


def _read_mask(path: Path, size: tuple[int, int]) -> Image.Image:
    """A person mask as 8-bit L; it must have its photo's size (it was cut with it)."""
    try:
        with Image.open(path) as raw:
            mask = raw.convert("L")
    except UNREADABLE as error:
        raise PhotoError(f"cannot read person mask {path}: {error}\n  -> re-run tools/crop.py, or train "
                         "without --masked_loss") from error
    if mask.size != size:
        raise PhotoError(f"person mask {path} is {mask.size[0]}x{mask.size[1]} but its photo is {size[0]}x{size[1]}: "
                         "re-run tools/crop.py to make them again, or train without --masked_loss")
    return mask


def load_class_images(class_dir: str | Path, resolution: int, num_images: int, min_side: int = 128,
                      class_prompt: str = "") -> tuple[list[TrainImage], str | None]:
    """The first `num_images` images of a class set (centre crops) with their captions, or `class_prompt`
    for all of them when given. Returns the images and a warning when the set holds fewer."""
    try:
        pairs = load_class_set(class_dir)
    except ClassSetError as error:
        raise PhotoError(f"prior preservation needs a class image set: {error}\n"
                        "  -> or train without it: --no_prior_preservation") from error
    warning = None
    if len(pairs) < num_images:
        warning = (f"the class set {class_dir} holds {len(pairs)} images, fewer than --num_class_images "
                   f"{num_images}: training with {len(pairs)}; to have more, {MAKE_HINT} with -n {num_images}")
    images = [TrainImage(path, square_crop(open_image(path, min_side), resolution), "center",
                         class_prompt or caption)
              for path, caption in pairs[:num_images]]
    return images, warning
