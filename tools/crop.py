"""Turn raw subject photos into training crops: EXIF-upright RGB, background removed, head-and-shoulders
framing around the detected face, the training size without squashing the aspect ratio.

    python tools/crop.py -i train_data -o train_data_crop [--size 512] [--no_rembg] ...

`-i` is either a root holding one folder per subject (`train_data/<name>/`) or one subject folder
(then the crops go straight into `-o`). Every output folder gets a `crops.json` recording, per photo,
the face box (in the crop's pixels), crop box, detection score, backend and status; re-runs skip photos
whose source hash and settings are unchanged. With background removal, each crop's person mask
(255 = person) is kept as `masks/<crop stem>.png` in the output folder.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from any folder: the repository's libs/
from typing import Sequence  # noqa: E402

from PIL import ImageColor  # noqa: E402

from libs.errors import run_cli  # noqa: E402
from libs.face import DlibBackend, InsightFaceBackend  # noqa: E402
from libs.preprocess import DEFAULT_REMBG_MODEL, CropSettings, PreprocessError, crop_dataset, summarize  # noqa: E402


def parse_size(text: str) -> tuple[int, int]:
    """`512` (square) or `WIDTHxHEIGHT`."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"size must be N or WIDTHxHEIGHT, got {text!r}")
    return parts[0], parts[1]


def parse_color(text: str) -> tuple[int, int, int]:
    """`white`, `#rrggbb` or `r,g,b`."""
    try:
        if "," in text:
            values = tuple(int(v) for v in text.split(","))
            if len(values) != 3 or not all(0 <= v <= 255 for v in values):
                raise ValueError
            return values  # type: ignore[return-value]
        return ImageColor.getrgb(text)[:3]
    except ValueError:
        raise argparse.ArgumentTypeError(f"colour must be a name, #rrggbb or r,g,b, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    crop = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = CropSettings()
    crop.add_argument("-i", "--input", default="train_data", help="train_data root or one subject folder")
    crop.add_argument("-o", "--output", default="train_data_crop", help="where crops (and crops.json) go")
    crop.add_argument("--size", type=parse_size, default=defaults.size, help="N or WIDTHxHEIGHT (default 512)")
    crop.add_argument("--face_scale", type=float, default=defaults.face_scale,
                      help="crop height in face sizes (default %(default)s; larger = more shoulders)")
    crop.add_argument("--face_y", type=float, default=defaults.face_y,
                      help="face centre position as a fraction of the crop height from the top (default %(default)s)")
    crop.add_argument("--no_face", choices=("center", "skip"), default=defaults.no_face,
                      help="photos without a detected face: center-crop them or leave them out (default %(default)s)")
    crop.add_argument("--face_backend", choices=("auto", "insightface", "dlib"), default=defaults.face_backend)
    crop.add_argument("--min_face_score", type=float, default=None,
                      help="ignore weaker detections (default: dlib %s, insightface %s)"
                      % (DlibBackend.min_score, InsightFaceBackend.min_score))
    crop.add_argument("--no_rembg", action="store_true", help="only crop, keep the original background (no person masks)")
    crop.add_argument("--rembg_model", default=None,
                      help=f"rembg model name (default {DEFAULT_REMBG_MODEL}; u2net_custom with --rembg_model_path)")
    crop.add_argument("--rembg_model_path", default=None, help="a local ONNX file for a custom rembg model")
    crop.add_argument("--bg_color", type=parse_color, default=defaults.bg_color,
                      help="background colour: name, #rrggbb or r,g,b (default white)")
    crop.add_argument("--force", action="store_true", help="redo every photo even if its crop is up to date")
    return crop


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> CropSettings:
    model = args.rembg_model or ("u2net_custom" if args.rembg_model_path else DEFAULT_REMBG_MODEL)
    return CropSettings(
        size=tuple(args.size), face_scale=args.face_scale, face_y=args.face_y, no_face=args.no_face,
        face_backend=args.face_backend, min_face_score=args.min_face_score, rembg=not args.no_rembg, rembg_model=model,
        rembg_model_path=str(Path(args.rembg_model_path).expanduser().resolve()) if args.rembg_model_path else None,
        bg_color=tuple(args.bg_color),
    )


def main(args: argparse.Namespace) -> None:
    """An error (exit 2) when no crop at all exists afterwards or the setup failed."""
    reports = crop_dataset(args.input, args.output, settings_from_args(args), force=args.force)
    print(summarize(reports))
    if not any(report.outputs for report in reports):
        raise PreprocessError("no crop could be made from any photo (see above)")


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
