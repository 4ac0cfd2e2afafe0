"""The GPU Dockerfile lints clean (no Docker engine runs here, so linting is the check we can do)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is missing: pip install -r requirements-dev.txt")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_installs_requirements_and_keeps_models_a_mount():
    text = (ROOT / "Dockerfile").read_text()
    assert "pip install -r requirements.txt" in text
    assert 'VOLUME ["/workspace/models"]' in text


def test_submission_image_is_offline_and_bakes_what_is_not_mounted():
    from libs.config import EXTRA_MODELS_ENV
    from libs.submission import STAGE_DIR

    text = (ROOT / "Dockerfile").read_text()
    assert "HF_HUB_OFFLINE=1" in text and f"{EXTRA_MODELS_ENV}=/opt/unidiffuser/models" in text
    assert f"COPY {STAGE_DIR.as_posix()}/ /opt/unidiffuser/models/" in text
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for private in ("models/", "train_data/", "train_data_crop/", "outputs/", ".venv", ".git"):
        assert private in ignored  # weights are mounted, photos are never redistributed
    assert not any(entry.startswith(("model_output", "build")) for entry in ignored)  # the submission itself
