"""Shared fixtures: the tiny model world, the personalizations and the models built from it (each made once per
session through the real writers and reused read-only; a test that changes one works on a copy), and
public-domain photos read from installed packages (never committed competition data)."""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import ml_collections
import numpy as np
import pytest
import torch
from PIL import Image

from libs.tiny_submission import tiny_world_config
from libs.tiny_world import build_tiny_world
from libs.tiny_submission import write_personalization, write_subjects, write_tiny_insightface_pack

if TYPE_CHECKING:
    from libs.face import DlibBackend

# the processes the tests start (entry scripts, train.sh, sample.sh) run toy-sized ops on one thread too
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: full-size or end-to-end checks (run in CI; skip locally with -m 'not slow')")
    # with -n (`make test`) and no --dist given, the workers share the queue (pytest-xdist's worksteal: an idle
    # worker takes half of another's waiting tests). xdist's default `load` hands each worker a fixed first chunk
    # of consecutive tests, so the slow checks, sorted first, all queued on one worker while the other ran dry.
    if getattr(config.option, "dist", "no") == "load" and not any(
            arg.startswith("--dist") for arg in config.invocation_params.args):
        config.option.dist = "worksteal"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow end-to-end checks first: with several workers (`make test` runs pytest-xdist, sharing the queue:
    pytest_configure) the long ones start at once and an idle worker takes over the waiting ones, instead of one
    worker busy with a long check at the end while the others wait."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


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


@pytest.fixture(scope="session")
def tiny_session_config(tiny_world: Path) -> ml_collections.ConfigDict:
    """The tiny config for session-scoped builders (they must not change it)."""
    return tiny_world_config(tiny_world)


@pytest.fixture()
def tiny_config(tiny_world: Path) -> ml_collections.ConfigDict:
    """A fresh tiny config (safe to mutate) whose weight paths point at the session's tiny world."""
    return copy.deepcopy(tiny_world_config(tiny_world))


def write_config_file(config: ml_collections.ConfigDict, path: Path) -> Path:
    """A config file for the scripts' --config flag: the tiny config with `config`'s weight paths."""
    path.write_text(
        "from libs.config import load_config\n\n\n"
        "def get_config():\n"
        "    config = load_config('tiny')\n"
        f"    config.paths.update({config.paths.to_dict()!r})\n"
        "    return config\n"
    )
    return path


@pytest.fixture()
def tiny_config_file(tiny_config: ml_collections.ConfigDict, tmp_path: Path) -> Path:
    """A config file for the scripts' --config flag: the tiny config with the session's tiny-world paths."""
    return write_config_file(tiny_config, tmp_path / "tiny_test_config.py")


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


def write_photos(root: Path, public_photos: dict[str, Image.Image]) -> Path:
    """A subject folder `root/train_data/boy1` with two public-domain portraits (one .jpg, one .jpeg)."""
    folder = root / "train_data" / "boy1"
    folder.mkdir(parents=True)
    public_photos["astronaut"].save(folder / "astronaut.jpg", quality=95)
    public_photos["grace_hopper"].save(folder / "grace_hopper.jpeg", quality=95)
    return folder


@pytest.fixture()
def photos(tmp_path: Path, public_photos: dict[str, Image.Image]) -> Path:
    """A subject folder `train_data/boy1` with two public-domain portraits (one .jpg, one .jpeg)."""
    return write_photos(tmp_path, public_photos)


def stop_at(step: int) -> Callable[[int, dict], None]:
    """A train() `on_step` callback that interrupts the run after `step`, as Ctrl-C would (the resume tests)."""
    def stop(current: int, logs: dict) -> None:
        if current == step:
            raise KeyboardInterrupt
    return stop


def wait_until(condition: Callable[[], bool], process: subprocess.Popen, what: str, seconds: float = 300) -> None:
    """Poll `condition` while `process` runs, until it holds: the signal tests' moment to send (fails naming `what`
    if it never comes, with the process's output if it ended first)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.05)


def stop_when(process: subprocess.Popen, condition: Callable[[], bool], what: str,
              send: Callable[[], None] | None = None, seconds: float = 300) -> tuple[str, str]:
    """Once `condition` holds (wait_until), `send()` the stop (default: SIGTERM to `process`, as `docker stop` or a
    scheduler sends it) and return the process's (stdout, stderr) when it has exited; killed if anything fails."""
    try:
        wait_until(condition, process, what, seconds)
        (send or (lambda: process.send_signal(signal.SIGTERM)))()
        return process.communicate(timeout=seconds)
    finally:
        if process.poll() is None:
            process.kill()


def logged_step(out: Path) -> int:
    """The highest step in a run's JSONL log so far (0 before any; step 0 is the first validation's record)."""
    log = out / "logs" / "train_log.jsonl"
    lines = log.read_text().splitlines() if log.is_file() else []
    return max((json.loads(line).get("step", 0) for line in lines if line.strip().endswith("}")), default=0)


def copy_folder(source: Path, destination: Path) -> Path:
    """A test's own copy of a session-built folder (file times kept), to change as it likes."""
    shutil.copytree(source, destination)
    return destination


@pytest.fixture(scope="session")
def personalization(tiny_session_config: ml_collections.ConfigDict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-2 personalization of a boy in our format (random non-zero LoRA B, a `<new1>` row). Read-only:
    a test that changes it takes `copy_folder` of it."""
    folder = tmp_path_factory.mktemp("personalization") / "boy1"
    write_personalization(tiny_session_config, folder, rank=2, class_word="boy", seed=0)
    return folder


@pytest.fixture(scope="session")
def subject_personalizations(tiny_session_config: ml_collections.ConfigDict,
                             tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One personalization per competition subject, each of another rank (so each count differs). Read-only."""
    return write_subjects(tiny_session_config, tmp_path_factory.mktemp("personalizations"))


@pytest.fixture(scope="session")
def positive_clip_dir(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny CLIP ViT-B/32 with its text projection negated: its text/image cosines become positive (the
    original's are all negative, so every CLIP-T would be clamped to 0 and compare trivially)."""
    from transformers import CLIPModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip_positive")
    source = tiny_world / "clip-vit-base-patch32"
    model = CLIPModel.from_pretrained(source)
    with torch.no_grad():
        model.text_projection.weight.neg_()
    model.save_pretrained(folder)
    CLIPTokenizer.from_pretrained(source).save_pretrained(folder)
    for extra in source.glob("preprocessor_config.json"):
        (folder / extra.name).write_bytes(extra.read_bytes())
    return folder


@pytest.fixture(scope="session")
def tiny_insightface_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding models/buffalo_l/ with the tiny ONNX stand-ins (libs/tiny_submission.py) that insightface's
    own loader takes for the pack. Read-only: a test that damages it takes `copy_folder` of it."""
    root = tmp_path_factory.mktemp("insightface")
    write_tiny_insightface_pack(root)
    return root


@pytest.fixture(scope="session")
def dlib_backend() -> DlibBackend:
    """dlib's face detector and encoder, loaded once (stateless between calls)."""
    from libs.face import DlibBackend

    return DlibBackend()


@pytest.fixture()
def fresh_accelerate_state() -> Iterator[None]:
    """accelerate keeps one process-wide state that fixes the mixed precision of the first Accelerator; a test
    that runs train.py in this process with another precision starts and leaves that state blank, as a new
    process would (what accelerate's own test case does)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
