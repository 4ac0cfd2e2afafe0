"""Long runs stopped from outside (SIGTERM from a scheduler, a spot instance or `docker stop`; Ctrl-C) on the tiny
world: train.py finishes the step, writes a checkpoint, says how to resume and exits; `--resume latest` then
ends with exactly the weights and the choice of an uninterrupted run, whether the signal came at a random step,
during a validation or during a checkpoint write; a second signal stops at once with the last checkpoint intact;
a recipe search resumes without retraining a finished recipe; sample.sh leaves only whole images and a rerun
with --skip_existing completes the set bitwise.

The signals are real (os.kill), sent from the hooks train() offers (on_step, score_fn) so that they land at a
known point; the exit status and message of a real process are checked in the subprocess tests."""
from __future__ import annotations

import copy
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sample
from conftest import logged_step, stop_when, wait_until, write_photos
from entrypoints import run_entry, script_repo
from libs.config import REPO_ROOT
from libs.errors import Interrupted
from libs.photos import image_is_complete
from libs.train import METRICS, Rendered, ValidationScores, run_auto_recipe
from libs.train import train as train_fn
from libs.train_output import (AUTO_DIR, CHECKPOINT_DIR, CHECKPOINT_OPTIMIZER, CHECKPOINT_STATE, CHECKPOINT_WEIGHTS,
                               META_FILE, TABLE_FILE, TOKEN_FILE, UVIT_LORA_FILE, list_checkpoints)

STEPS = 8
RESULT_FILES = (UVIT_LORA_FILE, TOKEN_FILE)


class Scores:
    """A deterministic stand-in for the competition metric (a known objective per step); can send a signal to
    this process while a validation is being scored."""

    def __init__(self, signal_at: int | None = None):
        self.signal_at = signal_at
        self.calls: list[tuple[str, int]] = []

    def __call__(self, rendered: Rendered) -> ValidationScores:
        self.calls.append((rendered.folder.parent.parent.name, rendered.step))
        if rendered.step == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        values = {metric: 0.0 for metric in METRICS}
        values["sim_face"] = 1.0 - abs(rendered.step - 4) / 10  # step 4 is the best
        return ValidationScores(values, "test", True)


def signal_at(step: int, *signums: int):
    """An on_step hook that sends `signums` to this process after step `step`."""
    def hook(current: int, logs: dict) -> None:
        if current == step:
            for signum in signums:
                os.kill(os.getpid(), signum)
    return hook


def configure(config, **extra):
    config.train.update({"with_prior_preservation": False, "train_step": STEPS, "validation_steps": 2,
                         "checkpointing_steps": 3, "log_every": 1, **extra})
    return config


def result(out: Path) -> dict:
    """What decides a run's outcome: the adapters written and the record of the choice."""
    meta = json.loads((out / META_FILE).read_text())
    return {**{name: (out / name).read_bytes() for name in RESULT_FILES},
            "selection": meta["selection"], "trained_steps": meta.get("trained_steps")}


@pytest.fixture(scope="module")
def uninterrupted(tiny_session_config, public_photos, tmp_path_factory) -> dict:
    """The run every interrupted one must end equal to: trained once for the module (on one thread, as the
    tests' runs are: the autouse one_thread fixture is not set up yet for a module-scoped one)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_fn(configure(copy.deepcopy(tiny_session_config)), write_photos(root, public_photos), root / "out",
                 score_fn=Scores())
    finally:
        torch.set_num_threads(threads)
    return result(root / "out")


def assert_complete_checkpoints(out: Path) -> list[Path]:
    kept = list_checkpoints(out)
    for checkpoint in kept:
        assert {p.name for p in checkpoint.iterdir()} == {CHECKPOINT_WEIGHTS, CHECKPOINT_OPTIMIZER, CHECKPOINT_STATE}
    assert not list((out / CHECKPOINT_DIR).glob(".*.tmp"))
    return kept


@pytest.mark.parametrize("where", ["random_step", "validation", "checkpoint_write"])
def test_sigterm_then_resume_equals_an_uninterrupted_run(where, tiny_config, photos, tmp_path, uninterrupted):
    out = tmp_path / "interrupted"
    on_step, scores = None, Scores()
    if where == "random_step":
        step = random.randint(1, STEPS - 2)
        on_step = signal_at(step, signal.SIGTERM)
    elif where == "validation":
        step = 4  # the signal lands while step 4's images are scored
        scores = Scores(signal_at=step)
    else:
        step = 6  # after step 6's checkpoint was handed to the background writer, before it is awaited
        on_step = signal_at(step, signal.SIGTERM)
    with pytest.raises(Interrupted) as stopped:
        train_fn(configure(tiny_config), photos, out, on_step=on_step, score_fn=scores)
    message = str(stopped.value)
    assert stopped.value.signum == signal.SIGTERM
    assert f"SIGTERM at step {step + 1} of {STEPS}" in message and "--resume latest" in message, message
    kept = assert_complete_checkpoints(out)
    assert kept[-1].name.endswith(f"{step + 1:06d}")  # the step it stopped after was checkpointed
    assert not (out / META_FILE).exists() and not (out / ".lock").exists()

    train_fn(configure(tiny_config), photos, out, resume="latest", score_fn=Scores())
    assert result(out) == uninterrupted


def test_a_second_sigint_stops_at_once_keeping_the_last_checkpoint(tiny_config, photos, tmp_path, uninterrupted):
    out = tmp_path / "interrupted"
    with pytest.raises(Interrupted, match="SIGINT received; the last complete checkpoint is kept") as stopped:
        train_fn(configure(tiny_config), photos, out, on_step=signal_at(5, signal.SIGINT, signal.SIGINT),
                 score_fn=Scores())
    assert stopped.value.signum == signal.SIGINT
    assert [p.name for p in assert_complete_checkpoints(out)] == ["checkpoint-000003"]  # no stop checkpoint at 5
    assert not (out / ".lock").exists()
    train_fn(configure(tiny_config), photos, out, resume="latest", score_fn=Scores())
    assert result(out) == uninterrupted


def test_a_recipe_search_stopped_mid_recipe_resumes_to_the_same_winner(tiny_config, photos, tmp_path):
    def search(out: Path, **kwargs):
        config = configure(tiny_config, auto_recipe=True, auto_recipes=("base", "half_rank"), auto_budget=2 * STEPS,
                           train_step=4)
        return run_auto_recipe(config, photos, out, **kwargs)

    reference = search(tmp_path / "reference", score_fn=Scores())
    out = tmp_path / "interrupted"
    first = Scores()

    def stop_in_half_rank(step: int, logs: dict) -> None:
        if first.calls and first.calls[-1][0] == "half_rank" and step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted, match="SIGTERM at step 3 of 4"):
        search(out, score_fn=first, on_step=stop_in_half_rank)
    base_meta = out / AUTO_DIR / "base" / META_FILE
    finished = base_meta.stat().st_mtime_ns
    second = Scores()
    rows = search(out, resume="latest", score_fn=second)
    assert {recipe for recipe, _ in second.calls} == {"half_rank"}  # base was not trained again
    assert base_meta.stat().st_mtime_ns == finished
    assert rows == reference
    assert (out / AUTO_DIR / TABLE_FILE).read_text() == (tmp_path / "reference" / AUTO_DIR / TABLE_FILE).read_text()
    for name in RESULT_FILES:
        assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()


@pytest.mark.slow
def test_train_py_process_stops_on_sigterm_within_bounds(tiny_config_file, photos, tmp_path, capsys):
    """The real process: exit 128 + 15, one `stopped:` line with the command that continues, no traceback, the
    lock released; the command it prints finishes the run."""
    out = tmp_path / "run"
    args = ["--config", str(tiny_config_file), "-d", str(photos), "-o", str(out), "--no_prior_preservation",
            "--train_step", "400", "--checkpointing_steps", "1000", "--log_every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "train.py"), *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    try:
        wait_until(lambda: logged_step(out) >= 3, process, "step 3")
        seen = logged_step(out)  # the step that runs on is at least this one: the stop checkpoints it
        process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM, err
    assert time.monotonic() - sent < 60, "did not stop within a step and a checkpoint"
    assert "Traceback" not in err and err.count("stopped: SIGTERM at step") == 1, err
    assert "--resume latest" in err and not (out / ".lock").exists()
    [checkpoint] = assert_complete_checkpoints(out)
    assert json.loads((checkpoint / CHECKPOINT_STATE).read_text())["step"] >= seen >= 3


def _sample_layout(root: Path, personalization: Path, tiny_config_file: Path) -> Path:
    script_repo(root, ("sample.py", "sample.sh"))
    (root / "eval_prompts").mkdir()
    (root / "eval_prompts" / "boy1.json").write_text(json.dumps([f"a boy, picture {i}" for i in range(6)]))
    shutil.copytree(personalization, root / "model_output" / "boy1")
    (root / "config.py").write_text(tiny_config_file.read_text())
    return root


SAMPLE_ARGS = ["--config", "config.py", "--steps", "30", "--device", "cpu"]


@pytest.mark.slow
def test_sample_sh_stopped_leaves_whole_images_and_skip_existing_completes_them(tiny_config_file, personalization,
                                                                               tmp_path, monkeypatch):
    reference = _sample_layout(tmp_path / "reference", personalization, tiny_config_file)
    monkeypatch.chdir(reference)
    assert run_entry(sample, ["--all", *SAMPLE_ARGS]) == 0

    root = _sample_layout(tmp_path / "stopped", personalization, tiny_config_file)
    images = root / "outputs" / "boy1"
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VIRTUAL_ENV": str(Path(bin_dir).parent),
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    process = subprocess.Popen(["bash", str(root / "sample.sh"), *SAMPLE_ARGS], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    # sample.sh execs python: the signal reaches sample.py
    _, err = stop_when(process, lambda: images.is_dir() and any(images.glob("*-*.jpg")), "a first image")
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "--skip_existing" in err, err
    written = sorted(images.iterdir())
    assert written and all(image_is_complete(p) for p in written), written  # whole images, no temp files, no lock
    assert len(written) < 18 + 1, "the run ended before the signal: make it longer"

    monkeypatch.chdir(root)
    assert run_entry(sample, ["--all", *SAMPLE_ARGS, "--skip_existing"]) == 0
    expected = reference / "outputs" / "boy1"
    assert sorted(p.name for p in images.iterdir()) == sorted(p.name for p in expected.iterdir())
    differing = sorted(p.name for p in expected.iterdir() if (images / p.name).read_bytes() != p.read_bytes())
    assert differing == [], ([p.name for p in written], differing)
