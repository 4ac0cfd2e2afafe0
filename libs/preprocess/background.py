"""Background removal with rembg: one session per run (a named model from rembg's model folder, or a custom
ONNX file), and one segmentation per crop that yields both the composited picture and the person mask.

A failed model download names the exact URL rembg tried and where to save the file by hand.
"""
from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from PIL import Image

from libs.preprocess.settings import CUSTOM_REMBG_MODELS, DEFAULT_REMBG_MODEL, PreprocessError

REMBG_RELEASES = "https://github.com/danielgatis/rembg/releases/tag/v0.0.0"


class Cutout(NamedTuple):
    """One segmentation's two results: the same pixels, so the mask says exactly what was kept."""

    image: Image.Image  # RGB: the person over the background colour
    mask: Image.Image  # L, the image's size: the alpha the person was composited with (255 = person, 0 = background)


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

    def __call__(self, image: Image.Image) -> Cutout:
        """rembg's RGBA cut-out, its alpha kept as the mask and composited over the colour here (what
        rembg's own `bgcolor` does), so the mask costs no second segmentation."""
        rgba = self._remove(image.convert("RGB"), session=self.session)
        background = Image.new("RGBA", rgba.size, (*self.bg_color, 255))
        return Cutout(Image.alpha_composite(background, rgba).convert("RGB"), rgba.getchannel("A"))


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
