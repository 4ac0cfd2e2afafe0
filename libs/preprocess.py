"""Turn raw subject photos into training crops: EXIF-upright RGB, background removed, head-and-shoulders
framing around the detected face, the training size without squashing the aspect ratio.

The command line is tools/crop.py.

`-i` is either a root holding one folder per subject (`train_data/<name>/`) or one subject folder
(then the crops go straight into `-o`). Every output folder gets a `crops.json` recording, per photo,
the face box, crop box, detection score, backend and status; re-runs skip photos whose source hash
and settings are unchanged, so the step is cheap to repeat and its result is reproducible.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from libs.checkpoint import atomic_path, file_sha256, save_json
from libs.errors import UserError

PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
METADATA_NAME = "crops.json"
# bump when the cropping/compositing code changes what it writes, so old crops are redone
CROP_VERSION = 2  # 2: face_box in the crop's pixels (source_face_box in the photo's)
JPEG_QUALITY = 95
# BiRefNet's portrait model: the best hair/edge quality among rembg's local models for people (MIT).
DEFAULT_REMBG_MODEL = "birefnet-portrait"
CUSTOM_REMBG_MODELS = ("u2net_custom", "dis_custom", "ben_custom")
REMBG_RELEASES = "https://github.com/danielgatis/rembg/releases/tag/v0.0.0"
STATUS_FACE = "face"  # face found, cropped around it
STATUS_CENTER = "center"  # no face: center crop (--no_face center)
STATUS_SKIPPED = "skipped"  # no face: no output (--no_face skip)
STATUS_ERROR = "error"  # the photo could not be read

Box = tuple[float, float, float, float]


class PreprocessError(UserError):
    """A setup problem that stops the whole run (missing model, bad option), with the fix in the message."""


@dataclass(frozen=True)
class CropSettings:
    """Everything that changes the pixels of a crop; recorded in crops.json to decide what is up to date."""

    size: tuple[int, int] = (512, 512)  # output width, height
    face_scale: float = 3.0  # crop height = face_scale x face size (max side of the face box)
    face_y: float = 0.45  # face centre sits this fraction of the crop height from the top (headroom above)
    no_face: str = "center"  # "center" or "skip"
    face_backend: str = "auto"
    min_face_score: float | None = None  # None: the backend's min_score (libs/face.py)
    rembg: bool = True
    rembg_model: str = DEFAULT_REMBG_MODEL
    rembg_model_path: str | None = None
    bg_color: tuple[int, int, int] = (255, 255, 255)

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) < 1:
            raise PreprocessError(f"size must be two positive integers (width, height), got {self.size}")
        if self.face_scale < 1.0:
            raise PreprocessError(f"face_scale must be >= 1 so the crop holds the face, got {self.face_scale}")
        if not 0.0 <= self.face_y <= 1.0:
            raise PreprocessError(f"face_y is a fraction of the crop height (0..1), got {self.face_y}")
        if self.no_face not in ("center", "skip"):
            raise PreprocessError(f"no_face must be 'center' or 'skip', got {self.no_face!r}")
        if self.rembg_model_path and self.rembg_model not in CUSTOM_REMBG_MODELS:
            raise PreprocessError(
                f"--rembg_model_path loads a custom model: use --rembg_model {' or '.join(CUSTOM_REMBG_MODELS)} "
                f"(got {self.rembg_model!r}); a named model such as {DEFAULT_REMBG_MODEL} is found in rembg's model folder"
            )
        if self.rembg and self.rembg_model in CUSTOM_REMBG_MODELS and not self.rembg_model_path:
            raise PreprocessError(f"--rembg_model {self.rembg_model} needs --rembg_model_path FILE")

    def record(self) -> dict[str, Any]:
        """JSON form, with the crop code version and the custom model file's identity."""
        data = asdict(self)
        data["size"] = list(self.size)
        data["bg_color"] = list(self.bg_color)
        data["version"] = CROP_VERSION
        if not self.rembg:
            data.update(rembg_model=None, rembg_model_path=None)
        elif self.rembg_model_path:
            stat = Path(self.rembg_model_path).stat()
            data["rembg_model_file"] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        return data


# --- geometry ------------------------------------------------------------------------------------

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
                remover: "BackgroundRemover | None" = None) -> Image.Image:
    """Resample `box` of `image` to `out_size`; the part of the box outside the photo is `bg_color`.

    The background is removed on the resized in-photo region only, so the segmentation model sees the
    person at training scale and big photos cost no more than small ones.
    """
    x0, y0, x1, y1 = box
    scale_x, scale_y = out_size[0] / (x1 - x0), out_size[1] / (y1 - y0)
    inner = clip_box(box, *image.size)
    dx0, dy0 = round((inner[0] - x0) * scale_x), round((inner[1] - y0) * scale_y)
    dx1, dy1 = round((inner[2] - x0) * scale_x), round((inner[3] - y0) * scale_y)
    canvas = Image.new("RGB", out_size, bg_color)
    if dx1 <= dx0 or dy1 <= dy0:
        return canvas
    region = image.resize((dx1 - dx0, dy1 - dy0), Image.Resampling.LANCZOS, box=inner)
    if remover is not None:
        region = remover(region)
    canvas.paste(region, (dx0, dy0))
    return canvas


# --- background removal --------------------------------------------------------------------------

class BackgroundRemover:
    """One rembg session, created once and reused for every photo; composites onto a solid colour."""

    def __init__(self, model: str = DEFAULT_REMBG_MODEL, model_path: str | Path | None = None,
                 bg_color: tuple[int, int, int] = (255, 255, 255)):
        try:
            import rembg  # slow first import (numba compiles), so only when background removal is used
        except ImportError as error:
            raise PreprocessError(f"background removal needs rembg ({error}): pip install \"rembg[cpu]\", "
                                  "or crop only with --no_rembg") from error

        self._remove = rembg.remove
        self.bg_color = tuple(bg_color)
        if model_path is not None:
            self.session = _custom_session(rembg.new_session, model, Path(model_path))
        else:
            self.session = _named_session(rembg, model)

    def __call__(self, image: Image.Image) -> Image.Image:
        cutout = self._remove(image.convert("RGB"), session=self.session, bgcolor=(*self.bg_color, 255))
        return cutout.convert("RGB")


def _custom_session(new_session: Any, model: str, path: Path):
    """rembg only accepts custom model files under its home folder: point the home at the file's folder."""
    path = path.expanduser().resolve()
    if not path.is_file():
        raise PreprocessError(f"rembg model file not found: {path}")
    with _environment(REMBG_HOME=str(path.parent), U2NET_HOME=str(path.parent)):
        try:
            return new_session(model, model_path=str(path))
        except Exception as error:  # noqa: BLE001 - onnxruntime raises several types for a bad file
            raise PreprocessError(f"cannot load rembg model {path} as {model}: {error}") from error


def _named_session(rembg: Any, model: str):
    """A named rembg model: loaded from rembg's model folder, downloaded there on first use."""
    from rembg.sessions import sessions

    session_class = sessions.get(model)
    if session_class is None:
        known = ", ".join(sorted(name for name in sessions if name not in CUSTOM_REMBG_MODELS))
        raise PreprocessError(f"unknown rembg model {model!r}; known: {known}")
    target = Path(session_class.model_dir()) / f"{model}.onnx"
    with _capture_download_urls() as urls:
        try:
            return rembg.new_session(model)
        except Exception as error:  # noqa: BLE001 - network, checksum and onnxruntime errors all end here
            url = urls[-1] if urls else f"the {model} .onnx file from {REMBG_RELEASES}"
            raise PreprocessError(
                f"rembg model {model!r} is not installed and could not be downloaded "
                f"({type(error).__name__}: {str(error)[:200]})\n"
                f"  -> download {url}\n"
                f"     and save it as {target}\n"
                f"     (rembg's model folder follows $REMBG_HOME; point it elsewhere to keep models there)\n"
                f"  -> or crop without background removal: --no_rembg"
            ) from error


@contextmanager
def _capture_download_urls() -> Iterator[list[str]]:
    """Collect the URLs rembg asks pooch (its downloader) to fetch, so a failed download names the exact file."""
    import pooch

    urls: list[str] = []

    class _Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found = re.search(r"data from '([^']+)'", record.getMessage())
            if found:
                urls.append(found.group(1))

    logger = pooch.get_logger()
    handler = _Grab()
    logger.addHandler(handler)
    try:
        yield urls
    finally:
        logger.removeHandler(handler)


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --- per-subject processing ----------------------------------------------------------------------

@dataclass
class SubjectReport:
    """What happened to one subject folder; `entries` mirror crops.json, `fresh` names the redone photos."""

    name: str
    source: Path
    output: Path
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    fresh: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    def names_with(self, status: str) -> list[str]:
        return [name for name, entry in self.entries.items() if entry["status"] == status]

    @property
    def outputs(self) -> int:
        return sum(1 for entry in self.entries.values() if entry.get("output"))


@functools.lru_cache(maxsize=None)
def _face_backend(name: str):
    """Face models are loaded once per process, however many folders or runs use them."""
    from libs.face import get_face_backend

    return get_face_backend(name)


class _Tools:
    """Face backend and background remover, built on first use so up-to-date re-runs load nothing."""

    def __init__(self, settings: CropSettings):
        self.settings = settings
        self._face = None
        self._remover = None

    @property
    def face(self):
        if self._face is None:
            self._face = _face_backend(self.settings.face_backend)
        return self._face

    @property
    def remover(self) -> BackgroundRemover | None:
        if not self.settings.rembg:
            return None
        if self._remover is None:
            self._remover = BackgroundRemover(self.settings.rembg_model, self.settings.rembg_model_path,
                                              self.settings.bg_color)
        return self._remover


def is_photo(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in PHOTO_EXTENSIONS


def load_photo(path: Path) -> Image.Image:
    """Upright RGB pixels of a photo (EXIF orientation applied); raises ValueError naming the file."""
    try:
        with Image.open(path) as raw:
            raw.load()
            image = ImageOps.exif_transpose(raw)
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, ValueError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


def _read_metadata(path: Path, settings_record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Entries of an earlier run, only if made with the same settings (otherwise everything is redone)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("settings") != settings_record:
        return {}
    photos = data.get("photos")
    return dict(photos) if isinstance(photos, dict) else {}


def _up_to_date(entry: dict[str, Any] | None, digest: str, out_dir: Path) -> bool:
    if not entry or entry.get("sha256") != digest or entry.get("status") == STATUS_ERROR:
        return False
    output = entry.get("output")
    return output is None or (out_dir / output).is_file()


def crop_photo(image: Image.Image, settings: CropSettings, tools: _Tools) -> tuple[Image.Image | None, dict[str, Any]]:
    """Detect the face, frame it and render the crop; returns (crop or None when skipped, metadata)."""
    pixels = np.asarray(image)
    detections = tools.face.detect(pixels)
    threshold = tools.face.min_score if settings.min_face_score is None else settings.min_face_score
    face = tools.face.primary_face(pixels, threshold)
    meta: dict[str, Any] = {
        "image_size": list(image.size),
        "backend": tools.face.name,
        "detection_scores": [round(float(face.score), 4) for face in detections],
        "min_face_score": threshold,
        "face_box": None,
        "source_face_box": None,
        "score": None,
        "crop_box": None,
    }
    if face is not None:
        box = face_crop_box(face.bbox, image.size, settings.size, settings.face_scale, settings.face_y)
        meta.update(status=STATUS_FACE, source_face_box=_rounded(face.bbox), score=round(float(face.score), 4),
                    face_box=_rounded(box_in_crop(face.bbox, box, settings.size)))
    elif settings.no_face == "center":
        box = center_crop_box(image.size, settings.size)
        meta["status"] = STATUS_CENTER
    else:
        meta["status"] = STATUS_SKIPPED
        return None, meta
    meta["crop_box"] = _rounded(box)
    return render_crop(image, box, settings.size, settings.bg_color, tools.remover), meta


def _rounded(box: Sequence[float]) -> list[float]:
    return [round(float(v), 2) for v in box]


def crop_subject(source: Path, output: Path, settings: CropSettings, tools: _Tools | None = None,
                 force: bool = False, progress: tqdm | None = None) -> SubjectReport:
    """Crop every photo of one subject folder into `output`, updating `output/crops.json` after each one."""
    tools = tools or _Tools(settings)
    report = SubjectReport(name=source.name, source=source, output=output)
    record = settings.record()
    meta_path = output / METADATA_NAME
    previous = {} if force else _read_metadata(meta_path, record)
    files = sorted(source.iterdir())
    photos = [p for p in files if is_photo(p)]
    report.ignored = [p.name + ("/" if p.is_dir() else "") for p in files if not is_photo(p)]
    claimed: dict[str, str] = {}
    known = _read_all_outputs(meta_path)
    for path in photos:
        out_name = f"{path.stem}.jpg"
        entry = _process_photo(path, out_name, claimed, previous, settings, tools, report, force)
        report.entries[path.name] = entry
        if entry.get("output"):
            claimed[out_name] = path.name
        save_json({"settings": record, "photos": report.entries}, meta_path)
        if progress is not None:
            progress.update(1)
    _remove_stale(output, known, report)
    if report.entries or meta_path.exists():
        save_json({"settings": record, "photos": report.entries}, meta_path)
    return report


def _process_photo(path: Path, out_name: str, claimed: dict[str, str], previous: dict[str, dict[str, Any]],
                   settings: CropSettings, tools: _Tools, report: SubjectReport, force: bool) -> dict[str, Any]:
    out_path = report.output / out_name
    if out_name in claimed:
        return _error_entry(None, f"{path} would overwrite {out_name} made from {claimed[out_name]}; rename one of them")
    try:
        digest = file_sha256(path)
    except OSError as error:
        return _error_entry(None, f"cannot read {path}: {error}")
    old = previous.get(path.name)
    if not force and _up_to_date(old, digest, report.output):
        return old
    try:
        image = load_photo(path)
    except ValueError as error:
        return _error_entry(digest, str(error))
    crop, meta = crop_photo(image, settings, tools)
    entry = {"output": None, "status": meta.pop("status"), "sha256": digest, **meta,
             "rembg": settings.rembg_model if settings.rembg and crop is not None else None}
    if crop is not None:
        with atomic_path(out_path) as tmp:
            crop.save(tmp, format="JPEG", quality=JPEG_QUALITY)
        entry["output"] = out_name
    report.fresh.append(path.name)
    return entry


def _error_entry(digest: str | None, message: str) -> dict[str, Any]:
    return {"output": None, "status": STATUS_ERROR, "sha256": digest, "error": message}


def _read_all_outputs(meta_path: Path) -> dict[str, str]:
    """Output files an earlier run wrote (whatever its settings): {source name: output name}."""
    try:
        photos = json.loads(meta_path.read_text()).get("photos", {})
        return {name: entry["output"] for name, entry in photos.items() if entry.get("output")}
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        return {}


def _remove_stale(output: Path, known: dict[str, str], report: SubjectReport) -> None:
    """Delete crops this tool made earlier whose source photo is gone or no longer yields an output."""
    current = {entry["output"] for entry in report.entries.values() if entry.get("output")}
    for source_name, out_name in known.items():
        if out_name not in current and (output / out_name).is_file():
            (output / out_name).unlink()
            report.removed.append(f"{out_name} (from {source_name})")


# --- whole dataset -------------------------------------------------------------------------------

def find_subjects(input_root: Path, output_root: Path) -> list[tuple[Path, Path]]:
    """(source folder, output folder) pairs: one per subject folder, or the root itself if it holds photos."""
    if not input_root.is_dir():
        raise PreprocessError(f"input folder not found: {input_root}")
    entries = sorted(input_root.iterdir())
    if any(is_photo(p) for p in entries):
        return [(input_root, output_root)]
    subjects = [(p, output_root / p.name) for p in entries if p.is_dir() and not p.name.startswith(".")]
    if not subjects:
        raise PreprocessError(f"no subject folders (or photos) in {input_root}; expected {input_root}/<name>/*.jpg")
    return subjects


def crop_dataset(input_root: str | Path, output_root: str | Path, settings: CropSettings,
                 force: bool = False) -> list[SubjectReport]:
    """Crop every subject under `input_root` into `output_root/<name>/` (see the module docstring)."""
    pairs = find_subjects(Path(input_root), Path(output_root))
    for source, output in pairs:
        if source.resolve() == output.resolve():
            raise PreprocessError(f"output folder {output} is the photo folder itself; crops would replace the photos")
    total = sum(1 for source, _ in pairs for p in source.iterdir() if is_photo(p))
    tools = _Tools(settings)
    reports = []
    with tqdm(total=total, desc="crop", unit="photo") as progress:
        for source, output in pairs:
            progress.set_postfix_str(source.name)
            reports.append(crop_subject(source, output, settings, tools, force=force, progress=progress))
    return reports


def summarize(reports: Sequence[SubjectReport]) -> str:
    """One block per subject: counts, then every photo that needs attention, by name."""
    lines = []
    for report in reports:
        faces, centered = report.names_with(STATUS_FACE), report.names_with(STATUS_CENTER)
        skipped, errors = report.names_with(STATUS_SKIPPED), report.names_with(STATUS_ERROR)
        reused = len(report.entries) - len(report.fresh) - len(errors)
        lines.append(
            f"{report.name}: {report.outputs} crops in {report.output} "
            f"({len(faces)} around a face, {len(centered)} center-cropped, {len(skipped)} skipped, "
            f"{len(errors)} errors; {len(report.fresh)} new, {max(reused, 0)} up to date)"
        )
        if not report.entries:
            lines.append(f"  no photos ({', '.join(PHOTO_EXTENSIONS)}) in {report.source}")
        for name in centered:
            lines.append(f"  no face found: {name} (center-cropped)")
        for name in skipped:
            lines.append(f"  no face found: {name} (skipped, no crop written)")
        for name in errors:
            lines.append(f"  error: {report.entries[name]['error']}")
        for name in report.ignored:
            lines.append(f"  ignored (not {'/'.join(PHOTO_EXTENSIONS)}): {report.source / name}")
        for name in report.removed:
            lines.append(f"  removed stale crop: {name}")
    total = sum(r.outputs for r in reports)
    lines.append(f"total: {total} crops for {len(reports)} subject(s)")
    return "\n".join(lines)
