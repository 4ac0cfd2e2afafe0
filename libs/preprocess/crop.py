"""The cropping run over photo folders: per photo, face detection, framing and rendering; per folder, the
crops, their person masks (`masks/`, with background removal) and `crops.json`; re-runs redo only what changed.

`-i` is either a root holding one folder per subject (`train_data/<name>/`) or one subject folder
(then the crops go straight into `-o`). Every output folder gets a `crops.json` recording, per photo,
the face box, crop box, detection score, backend, mask and status; re-runs skip photos whose source hash
and settings are unchanged, so the step is cheap to repeat and its result is reproducible.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from libs.files import atomic_path, file_sha256
from libs.outputs import check_output_folder, each, holding
from libs.photos import (CROPS_FILE, IMAGE_EXTENSIONS, MASKS_FOLDER, PhotoError, is_image_file, open_image,
                         read_crops_record, write_crops_record)
from libs.preprocess.background import BackgroundRemover
from libs.preprocess.geometry import box_in_crop, center_crop_box, face_crop_box, render_crop
from libs.preprocess.settings import CropSettings, PreprocessError

JPEG_QUALITY = 95
STATUS_FACE = "face"  # face found, cropped around it
STATUS_CENTER = "center"  # no face: center crop (--no_face center)
STATUS_SKIPPED = "skipped"  # no face: no output (--no_face skip)
STATUS_ERROR = "error"  # the photo could not be read


@dataclass
class SubjectReport:
    """What happened to one subject folder; `entries` mirror crops.json, `fresh` names the redone photos."""

    name: str
    source: Path
    output: Path
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    fresh: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # "crop: <file> (from <photo>)" or "mask: ..."

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


class CropTools:
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


def crop_photo(image: Image.Image, settings: CropSettings,
               tools: CropTools) -> tuple[Image.Image | None, Image.Image | None, dict[str, Any]]:
    """Detect the face, frame it and render the crop; returns (crop or None when skipped, person mask or None
    without background removal, metadata)."""
    pixels = np.asarray(image)
    detections = tools.face.detect(pixels)
    threshold = tools.face.min_score if settings.min_face_score is None else settings.min_face_score
    face = tools.face.first_face(detections, threshold)
    meta: dict[str, Any] = {
        "image_size": list(image.size),
        "backend": tools.face.name,
        "detection_scores": [round(float(found.score), 4) for found in detections],
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
        return None, None, meta
    meta["crop_box"] = _rounded(box)
    crop, mask = render_crop(image, box, settings.size, settings.bg_color, tools.remover)
    return crop, mask, meta


def _rounded(box: Sequence[float]) -> list[float]:
    return [round(float(v), 2) for v in box]


def _photos_and_others(folder: Path) -> tuple[list[Path], list[Path]]:
    """A folder's photos and its other visible entries, by name (hidden files are neither)."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    return [p for p in entries if is_image_file(p)], [p for p in entries if not is_image_file(p)]


def crop_subject(source: Path, output: Path, settings: CropSettings, tools: CropTools | None = None,
                 force: bool = False, progress: tqdm | None = None) -> SubjectReport:
    """Crop every photo of one subject folder into `output`, updating `output/crops.json` after each one."""
    tools = tools or CropTools(settings)
    report = SubjectReport(name=source.name, source=source, output=output)
    record = settings.record()
    earlier = read_crops_record(output)
    previous = {} if force else _entries_made_with(earlier, record)
    photos, others = _photos_and_others(source)
    report.ignored = [p.name + ("/" if p.is_dir() else "") for p in others]
    claimed: dict[str, str] = {}
    for path in photos:
        out_name = f"{path.stem}.jpg"
        entry = _process_photo(path, out_name, claimed, previous, settings, tools, report, force)
        report.entries[path.name] = entry
        if entry.get("output"):
            claimed[out_name] = path.name
        write_crops_record(output, record, report.entries)
        if progress is not None:
            progress.update(1)
    _remove_stale(output, _files_made(earlier), report)
    if report.entries or earlier is not None:
        write_crops_record(output, record, report.entries)
    return report


def _entries_made_with(earlier: dict[str, Any] | None, settings_record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Entries of an earlier run, only if made with the same settings (otherwise everything is redone)."""
    if earlier is None or earlier.get("settings") != settings_record:
        return {}
    return dict(earlier["photos"])


def _up_to_date(entry: dict[str, Any] | None, digest: str, out_dir: Path) -> bool:
    if not entry or entry.get("sha256") != digest or entry.get("status") == STATUS_ERROR:
        return False
    return all(name is None or (out_dir / name).is_file() for name in (entry.get("output"), entry.get("mask")))


def _process_photo(path: Path, out_name: str, claimed: dict[str, str], previous: dict[str, dict[str, Any]],
                   settings: CropSettings, tools: CropTools, report: SubjectReport, force: bool) -> dict[str, Any]:
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
        image = open_image(path)
    except PhotoError as error:
        return _error_entry(digest, str(error))
    crop, mask, meta = crop_photo(image, settings, tools)
    entry = {"output": None, "mask": None, "status": meta.pop("status"), "sha256": digest, **meta,
             "rembg": settings.rembg_model if settings.rembg and crop is not None else None}
    if crop is not None:
        with atomic_path(report.output / out_name) as tmp:
            crop.save(tmp, format="JPEG", quality=JPEG_QUALITY)
        entry["output"] = out_name
    if crop is not None and mask is not None:
        mask_name = f"{MASKS_FOLDER}/{Path(out_name).stem}.png"
        with atomic_path(report.output / mask_name) as tmp:
            mask.save(tmp, format="PNG")
        entry["mask"] = mask_name
    report.fresh.append(path.name)
    return entry


def _error_entry(digest: str | None, message: str) -> dict[str, Any]:
    return {"output": None, "mask": None, "status": STATUS_ERROR, "sha256": digest, "error": message}


def _files_made(earlier: dict[str, Any] | None) -> dict[str, tuple[str, str]]:
    """Files an earlier run wrote, whatever its settings: {file relative to the folder: (kind, source name)}."""
    made: dict[str, tuple[str, str]] = {}
    for name, entry in (earlier or {}).get("photos", {}).items():
        if not isinstance(entry, dict):
            continue
        for kind in ("output", "mask"):
            if isinstance(entry.get(kind), str):
                made[entry[kind]] = ("crop" if kind == "output" else "mask", name)
    return made


def _remove_stale(output: Path, made: dict[str, tuple[str, str]], report: SubjectReport) -> None:
    """Delete crops and masks this tool made earlier that no current entry holds (source photo gone, no
    output any more, or no background removal any more)."""
    current = {entry[kind] for entry in report.entries.values() for kind in ("output", "mask") if entry.get(kind)}
    for name, (kind, source_name) in made.items():
        path = output / name
        if name not in current and path.is_file() and path.resolve().is_relative_to(output.resolve()):
            path.unlink()
            report.removed.append(f"{kind}: {name} (from {source_name})")


# --- whole dataset -------------------------------------------------------------------------------

def find_subjects(input_root: Path, output_root: Path) -> list[tuple[Path, Path]]:
    """(source folder, output folder) pairs: one per subject folder, or the root itself if it holds photos."""
    if not input_root.is_dir():
        raise PreprocessError(f"input folder not found: {input_root}")
    entries = sorted(input_root.iterdir())
    if any(is_image_file(p) for p in entries):
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
    if pairs[0][1] != Path(output_root):
        check_output_folder(output_root, "crop output folder (-o)", each(holding(CROPS_FILE)))
    for _, output in pairs:
        check_output_folder(output, "crop output folder", holding(CROPS_FILE))
    total = sum(len(_photos_and_others(source)[0]) for source, _ in pairs)
    tools = CropTools(settings)
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
        masks = sum(1 for entry in report.entries.values() if entry.get("mask"))
        lines.append(
            f"{report.name}: {report.outputs} crops in {report.output} "
            f"({len(faces)} around a face, {len(centered)} center-cropped, {len(skipped)} skipped, "
            f"{len(errors)} errors; {len(report.fresh)} new, {max(reused, 0)} up to date)"
            + (f"; {masks} person masks in {report.output / MASKS_FOLDER}" if masks else "")
        )
        if not report.entries:
            lines.append(f"  no photos ({', '.join(IMAGE_EXTENSIONS)}) in {report.source}")
        for name in centered:
            lines.append(f"  no face found: {name} (center-cropped)")
        for name in skipped:
            lines.append(f"  no face found: {name} (skipped, no crop written)")
        for name in errors:
            lines.append(f"  error: {report.entries[name]['error']}")
        for name in report.ignored:
            lines.append(f"  ignored (not {'/'.join(IMAGE_EXTENSIONS)}): {report.source / name}")
        for item in report.removed:
            lines.append(f"  removed stale {item}")
    total = sum(r.outputs for r in reports)
    lines.append(f"total: {total} crops for {len(reports)} subject(s)")
    return "\n".join(lines)
