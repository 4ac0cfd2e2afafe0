"""Where a crop sits in a photo and how it is rendered: head-and-shoulders framing around a face box (or a
centre crop), the output's aspect ratio kept, boxes moved between photo and crop pixels."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from PIL import Image

from libs.photos import Box

if TYPE_CHECKING:
    from libs.preprocess.background import BackgroundRemover


def clip_box(box: Sequence[float], width: int, height: int) -> Box:
    """Detectors may return boxes that leave the image; keep the part inside it."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)


def face_crop_box(face: Sequence[float], image_size: tuple[int, int], out_size: tuple[int, int],
                  face_scale: float, face_y: float) -> Box:
    """Head-and-shoulders box with the output's aspect ratio around a face box.

    The box is `face_scale` face sizes tall, the face centre `face_y` of the way down. When that does
    not fit in the photo it shrinks (never below the face itself) rather than padding, then slides
    inside the photo; only a face too large for the aspect ratio leaves a padded margin.
    """
    width, height = image_size
    fx0, fy0, fx1, fy1 = clip_box(face, width, height)
    face_w, face_h = fx1 - fx0, fy1 - fy0
    if face_w <= 0 or face_h <= 0:
        raise ValueError(f"empty face box {tuple(face)} in a {width}x{height} image")
    aspect = out_size[0] / out_size[1]
    crop_h = face_scale * max(face_w, face_h)
    crop_w = crop_h * aspect
    fit = min(1.0, width / crop_w, height / crop_h)
    must_hold_face = max(face_w / crop_w, face_h / crop_h)
    scale = max(fit, must_hold_face)
    crop_w, crop_h = crop_w * scale, crop_h * scale
    cx, cy = (fx0 + fx1) / 2, (fy0 + fy1) / 2
    x0 = _slide_inside(cx - crop_w / 2, crop_w, width)
    y0 = _slide_inside(cy - face_y * crop_h, crop_h, height)
    return x0, y0, x0 + crop_w, y0 + crop_h


def _slide_inside(start: float, length: float, limit: float) -> float:
    """Move a 1-D interval inside [0, limit]; one longer than the limit is centred on it."""
    if length >= limit:
        return (limit - length) / 2
    return min(max(start, 0.0), limit - length)


def box_in_crop(box: Sequence[float], crop: Box, out_size: tuple[int, int]) -> Box:
    """A box in photo pixels expressed in the pixels of the crop rendered from `crop` at `out_size`."""
    sx, sy = out_size[0] / (crop[2] - crop[0]), out_size[1] / (crop[3] - crop[1])
    return ((box[0] - crop[0]) * sx, (box[1] - crop[1]) * sy, (box[2] - crop[0]) * sx, (box[3] - crop[1]) * sy)


def center_crop_box(image_size: tuple[int, int], out_size: tuple[int, int]) -> Box:
    """The largest centred box with the output's aspect ratio (used when no face is found)."""
    width, height = image_size
    aspect = out_size[0] / out_size[1]
    crop_w, crop_h = (height * aspect, float(height)) if width / height > aspect else (float(width), width / aspect)
    x0, y0 = (width - crop_w) / 2, (height - crop_h) / 2
    return x0, y0, x0 + crop_w, y0 + crop_h


def render_crop(image: Image.Image, box: Box, out_size: tuple[int, int], bg_color: tuple[int, int, int],
                remover: BackgroundRemover | None = None) -> tuple[Image.Image, Image.Image | None]:
    """Resample `box` of `image` to `out_size`; the part of the box outside the photo is `bg_color`.
    Returns (crop, person mask): the mask (mode L, 255 = person) comes with a `remover` and is 0 outside
    the photo; without one it is None.

    The background is removed on the resized in-photo region only, so the segmentation model sees the
    person at training scale and big photos cost no more than small ones.
    """
    x0, y0, x1, y1 = box
    scale_x, scale_y = out_size[0] / (x1 - x0), out_size[1] / (y1 - y0)
    inner = clip_box(box, *image.size)
    dx0, dy0 = round((inner[0] - x0) * scale_x), round((inner[1] - y0) * scale_y)
    dx1, dy1 = round((inner[2] - x0) * scale_x), round((inner[3] - y0) * scale_y)
    canvas = Image.new("RGB", out_size, bg_color)
    mask = Image.new("L", out_size, 0) if remover is not None else None
    if dx1 <= dx0 or dy1 <= dy0:
        return canvas, mask
    region = image.resize((dx1 - dx0, dy1 - dy0), Image.Resampling.LANCZOS, box=inner)
    if remover is not None:
        region, region_mask = remover(region)
        mask.paste(region_mask, (dx0, dy0))
    canvas.paste(region, (dx0, dy0))
    return canvas, mask
