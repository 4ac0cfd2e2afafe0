"""What a cropping run is configured with: the settings that change a crop's pixels, checked once, and the
crop code version, both recorded in crops.json so a re-run knows which crops are still up to date."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from libs.errors import UserError

# bump when the cropping/compositing code changes what it writes, so old crops are redone
CROP_VERSION = 3  # 2: face_box in the crop's pixels (source_face_box in the photo's); 3: person masks in masks/
# BiRefNet's portrait model: the best hair/edge quality among rembg's local models for people (MIT).
DEFAULT_REMBG_MODEL = "birefnet-portrait"
CUSTOM_REMBG_MODELS = ("u2net_custom", "dis_custom", "ben_custom")


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
