"""Training data: subject photos and class images -> square training crops -> VAE moments and CLIP image
embeddings, encoded once and cached (in memory, optionally on disk).

Photos are read upright (EXIF orientation), as RGB (transparent pixels over white), resized so the short
side is the training resolution (aspect ratio kept, never squashed) and cropped to a square: around the
face when a face box is known (the data-preparation step's `crops.json`, or a face detector), else in the
centre. A horizontal flip is a second cached *view* of the same image, not a per-step transform.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from libs.checkpoint import CheckpointError, file_sha256, load_safetensors, save_safetensors
from libs.errors import UserError
from libs.class_set import MAKE_HINT, ClassSetError, load_class_set
from libs.models.clip import clip_image_preprocess
from libs.photos import Box, PhotoError, face_boxes, list_images, open_image

CROP_MODES = ("face", "center")
CACHE_VERSION = 1  # bump when the encoding below changes, so old disk-cache entries are not reused
DataError = PhotoError


@dataclass(frozen=True)
class TrainImage:
    """One prepared square training image and where it came from."""

    path: Path
    image: Image.Image  # RGB, resolution x resolution
    crop: str  # how it was framed: "face (crops.json)", "face (<detector>)", "center (<why>)" or "center"
    caption: str | None = None  # the class set's caption (class images only)

    def views(self, hflip: bool) -> list[Image.Image]:
        """The image and, with `hflip`, its mirror: the cached augmentations."""
        return [self.image, ImageOps.mirror(self.image)] if hflip else [self.image]


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


def square_crop(image: Image.Image, resolution: int, face_box: Box | None = None) -> Image.Image:
    """Resize the short side to `resolution` (aspect ratio kept), then cut the square: centred on the
    face along the long side when a face box is given (slid to stay inside), else centred."""
    width, height = image.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    resized = image.resize((new_w, new_h), Image.LANCZOS) if (new_w, new_h) != (width, height) else image
    left, top = (new_w - resolution) / 2, (new_h - resolution) / 2
    if face_box is not None:
        cx = (face_box[0] + face_box[2]) / 2 * new_w / width
        cy = (face_box[1] + face_box[3]) / 2 * new_h / height
        left = min(max(cx - resolution / 2, 0), new_w - resolution)
        top = min(max(cy - resolution / 2, 0), new_h - resolution)
    left, top = round(left), round(top)
    return resized.crop((left, top, left + resolution, top + resolution))


def load_instance_images(folder: str | Path, resolution: int, crop: str = "face",
                         min_side: int = 128) -> list[TrainImage]:
    """Every photo of the subject folder, framed for training.

    crop "face": the square is centred on the face box from crops.json, else on a detected face, else
    on the image (each image's `crop` says which and why); "center": always on the image.
    """
    if crop not in CROP_MODES:
        raise DataError(f"crop mode {crop!r} not in {CROP_MODES}")
    paths = list_images(folder)
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
        images.append(TrainImage(path, square_crop(image, resolution, box), how))
    return images


def load_class_images(class_dir: str | Path, resolution: int, num_images: int, min_side: int = 128,
                      class_prompt: str = "") -> tuple[list[TrainImage], str | None]:
    """The first `num_images` images of a class set (centre crops) with their captions, or `class_prompt`
    for all of them when given. Returns the images and a warning when the set holds fewer."""
    try:
        pairs = load_class_set(class_dir)
    except ClassSetError as error:
        raise DataError(f"prior preservation needs a class image set: {error}\n"
                        "  -> or train without it: --no_prior_preservation") from error
    warning = None
    if len(pairs) < num_images:
        warning = (f"the class set {class_dir} holds {len(pairs)} images, fewer than --num_class_images "
                   f"{num_images}: training with {len(pairs)}; to have more, {MAKE_HINT} with -n {num_images}")
    images = [TrainImage(path, square_crop(open_image(path, min_side), resolution), "center",
                         class_prompt or caption)
              for path, caption in pairs[:num_images]]
    return images, warning


# --- encoding ------------------------------------------------------------------------------------


def vae_pixels(images: Sequence[Image.Image]) -> Tensor:
    """RGB images -> [B, 3, H, W] float32 in [-1, 1], the autoencoder's input range."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


class ImageEncoder:
    """The frozen VAE encoder and CLIP image tower: images -> (posterior moments, CLIP image embeddings)."""

    def __init__(self, autoencoder: torch.nn.Module, clip_image: torch.nn.Module, device: torch.device | str):
        self.autoencoder = autoencoder
        self.clip_image = clip_image
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> tuple[Tensor, Tensor]:
        dtype = next(self.autoencoder.parameters()).dtype
        moments = self.autoencoder.encode_moments(vae_pixels(images).to(self.device, dtype))
        clip = self.clip_image(clip_image_preprocess(images, self.clip_image.image_size))
        return moments.float().cpu(), clip.float().cpu()


class LatentSource:
    """Moments and CLIP embeddings of every view (image x flip) of an image list, kept on the CPU (a step
    draws its posterior samples there from seeded generators, then moves one small batch to the device).

    With `cached` they are encoded once, in chunks (and read from / written to `cache_dir` when given,
    keyed by the prepared pixels plus `cache_key`, which should name the encoders); otherwise the views a
    step asks for are encoded on the spot, exactly as the cache would hold them.
    """

    def __init__(self, images: Sequence[TrainImage], hflip: bool, encoder: ImageEncoder, cached: bool = True,
                 batch_size: int = 8, cache_dir: str | Path | None = None, cache_key: str = ""):
        self.images = list(images)
        self.num_flips = 2 if hflip else 1
        self.encoder: ImageEncoder | None = encoder
        self.moments: Tensor | None = None
        self.clip: Tensor | None = None
        if cached:
            self._encode_all(batch_size, Path(cache_dir) if cache_dir else None, cache_key)
            self.encoder = None  # the towers can be freed: every view is in the cache

    def __len__(self) -> int:
        return len(self.images) * self.num_flips

    def view(self, index: int) -> Image.Image:
        image, flip = divmod(index, self.num_flips)
        return self.images[image].views(self.num_flips == 2)[flip]

    def lookup(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Moments [B, 2C, h, w] and CLIP image embeddings [B, D] of these views (float32, CPU)."""
        if self.moments is not None:
            return self.moments[indices], self.clip[indices]
        return self.encoder([self.view(int(i)) for i in indices])

    def _encode_all(self, batch_size: int, cache_dir: Path | None, cache_key: str) -> None:
        moments: list[Tensor | None] = [None] * len(self)
        clip: list[Tensor | None] = [None] * len(self)
        keys = [self._key(i, cache_key) for i in range(len(self))] if cache_dir else []
        if cache_dir:
            for i, key in enumerate(keys):
                entry = cache_dir / f"{key}.safetensors"
                if entry.is_file():
                    try:
                        stored = load_safetensors(entry, "latent cache entry")
                    except CheckpointError:
                        continue  # a damaged entry is simply encoded again
                    moments[i], clip[i] = stored["moments"], stored["clip"]
        todo = [i for i in range(len(self)) if moments[i] is None]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            chunk_moments, chunk_clip = self.encoder([self.view(i) for i in chunk])
            for j, i in enumerate(chunk):
                moments[i], clip[i] = chunk_moments[j], chunk_clip[j]
                if cache_dir:
                    save_safetensors({"moments": moments[i], "clip": clip[i]}, cache_dir / f"{keys[i]}.safetensors")
        self.moments = torch.stack(moments)
        self.clip = torch.stack(clip)

    def _key(self, index: int, cache_key: str) -> str:
        digest = hashlib.sha256(f"v{CACHE_VERSION}|{cache_key}|".encode())
        digest.update(self.view(index).tobytes())
        return digest.hexdigest()


def describe_sources(images: Sequence[TrainImage]) -> list[dict[str, str]]:
    """What train_config.json records about each image: file, its sha256, how it was framed."""
    return [{"file": str(image.path), "sha256": file_sha256(image.path), "crop": image.crop} for image in images]
