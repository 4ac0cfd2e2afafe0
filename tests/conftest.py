"""Shared fixtures: the tiny model world (built once per session through the real writers) and
public-domain photos read from installed packages (never committed competition data)."""
from __future__ import annotations

import copy
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import torch
from PIL import Image

from libs.tiny_submission import tiny_world_config
from libs.tiny_world import build_tiny_world


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: full-size or end-to-end checks (run in CI; skip locally with -m 'not slow')")


@pytest.fixture(autouse=True)
def one_thread():
    """Toy-sized ops gain nothing from threads, and on shared cores thread hand-offs dominate: run on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder holding uvit_v1.pth, autoencoder_kl.pth, caption_decoder.pth and the two CLIP folders."""
    return build_tiny_world("tiny", tmp_path_factory.mktemp("tiny_world") / "models")


@pytest.fixture()
def tiny_config(tiny_world: Path) -> ml_collections.ConfigDict:
    """A fresh tiny config (safe to mutate) whose weight paths point at the session's tiny world."""
    return copy.deepcopy(tiny_world_config(tiny_world))


@pytest.fixture()
def tiny_config_file(tiny_config: ml_collections.ConfigDict, tmp_path: Path) -> Path:
    """A config file for the scripts' --config flag: the tiny config with the session's tiny-world paths."""
    path = tmp_path / "tiny_test_config.py"
    path.write_text(
        "from libs.config import load_config\n\n\n"
        "def get_config():\n"
        "    config = load_config('tiny')\n"
        f"    config.paths.update({tiny_config.paths.to_dict()!r})\n"
        "    return config\n"
    )
    return path


def _astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


def _grace_hopper() -> Image.Image:
    import matplotlib.cbook

    return Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")


def _camera() -> Image.Image:
    from skimage import data

    return Image.fromarray(np.stack([data.camera()] * 3, axis=-1))


@pytest.fixture(scope="session")
def public_photos() -> dict[str, Image.Image]:
    """Public-domain portraits (astronaut: Eileen Collins, NASA; Grace Hopper, US Navy) and CC0
    `camera` (a person with no detectable frontal face)."""
    return {"astronaut": _astronaut(), "grace_hopper": _grace_hopper(), "camera": _camera()}


@pytest.fixture()
def photos(tmp_path: Path, public_photos: dict[str, Image.Image]) -> Path:
    """A subject folder `train_data/boy1` with two public-domain portraits (one .jpg, one .jpeg)."""
    folder = tmp_path / "train_data" / "boy1"
    folder.mkdir(parents=True)
    public_photos["astronaut"].save(folder / "astronaut.jpg", quality=95)
    public_photos["grace_hopper"].save(folder / "grace_hopper.jpeg", quality=95)
    return folder
