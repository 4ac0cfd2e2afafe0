"""The command lines answer `--help`, a usage error and (train.py, score.py, demo) a refused output folder without
importing torch, transformers, peft or diffusers: those cost seconds of CPU per process, and every bad-input
run of a user (and of the test suite) would pay them. Real processes, their imports read from `-X importtime`."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from libs.config import REPO_ROOT

HEAVY = ("torch", "transformers", "peft", "diffusers", "accelerate")


def imported(argv: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `python -X importtime <argv>`; the process and the top-level packages it imported."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-X", "importtime", *argv], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)
    lines = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", done.stderr, re.M)
    names = {name.split(".")[0] for name in lines}
    return done, names


def test_the_import_list_is_read():
    done, names = imported(["-c", "import json, torch"], REPO_ROOT)
    assert done.returncode == 0 and {"json", "torch"} <= names


@pytest.mark.parametrize("script", ["train.py", "sample.py", "score.py", "tools/crop.py", "tools/class_images.py",
                                   "tools/download.py", "tools/demo.py"])
def test_help_imports_no_heavy_library(script, tmp_path):
    done, names = imported([str(REPO_ROOT / script), "--help"], tmp_path)
    assert done.returncode == 0 and "usage:" in done.stdout
    assert not names & set(HEAVY), sorted(names & set(HEAVY))


@pytest.mark.parametrize("argv", [["train.py", "-d", "photos"],  # -o missing
                                  ["sample.py", "--prompt_path", "p.json"],  # --output_path missing
                                  ["train.py", "-d", "photos", "-o", "out", "--rank", "0"]])  # out of range
def test_a_usage_error_imports_no_heavy_library(argv, tmp_path):
    done, names = imported([str(REPO_ROOT / argv[0]), *argv[1:]], tmp_path)
    assert done.returncode == 2 and "usage:" in done.stderr
    assert not names & set(HEAVY), sorted(names & set(HEAVY))


@pytest.mark.parametrize("argv", [["score.py", "--outputs"], ["tools/demo.py", "--workdir"],
                                  ["train.py", "--config", "tiny", "-d", "photos", "-o"]])
def test_a_refused_output_folder_imports_no_heavy_library(argv, tmp_path):
    taken = tmp_path / "taken.txt"
    taken.write_text("the user's file")
    done, names = imported([str(REPO_ROOT / argv[0]), *argv[1:], str(taken)], tmp_path)
    assert done.returncode == 2 and str(taken) in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not names & set(HEAVY), sorted(names & set(HEAVY))
