"""A parallel recipe search (`--auto_devices cpu,cpu`, one process per device) on the tiny world behaves as the
serial one: a recipe that diverges in its process is recorded as failed and the others go on; a search stopped
by SIGTERM while a recipe trains exits non-zero with the command that continues, and that command retrains no
finished recipe (their files untouched) and ends with the uninterrupted search's table and winner. Below them,
the device processes' side of a stop (libs/devices.py) with plain Python processes: the first signal is passed
on once and no further job starts; a second one is passed on too and ends the wait."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from copy import deepcopy
from pathlib import Path

import pytest

from libs.config import REPO_ROOT
from libs.devices import Job, run_on_devices
from libs.errors import Interrupted
from libs.stopping import StopSignals
from libs.train import run_auto_recipe
from libs.train_output import AUTO_DIR, FAILED_FILE, LOG_DIR, LOG_FILE, META_FILE, TABLE_FILE, TOKEN_FILE
from conftest import stop_when
from test_reliability_inputs import search_config

RECIPES = ("base", "vera", "double_lr")  # vera: another family, its projections seeded in a recipe process


@pytest.mark.slow
def test_a_recipe_diverging_in_its_process_is_recorded_as_failed(tiny_config, photos, tmp_path, capsys, monkeypatch):
    """The serial search's record (test_reliability_inputs), through two CPU processes."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    config = search_config(tiny_config, auto_devices="cpu,cpu", validation_face_backend="none")
    rows = run_auto_recipe(config, photos, out)
    printed = capsys.readouterr().out
    assert re.search(r"recipe double_lr failed: the (trained weights hold NaN|loss became).* at step \d", printed)
    by_recipe = {row["recipe"]: row for row in rows}
    assert by_recipe["double_lr"]["status"] == "failed" and by_recipe["double_lr"].get("score") is None
    assert by_recipe["base"]["winner"] and by_recipe["base"]["status"] == "trained" and (out / META_FILE).is_file()
    assert "failed" in (out / AUTO_DIR / TABLE_FILE).read_text()
    assert "double_lr" in json.loads((out / AUTO_DIR / FAILED_FILE).read_text())

    (out / META_FILE).unlink()  # as if stopped before the result was written: a resume retrains nothing
    logs = {path: path.stat().st_mtime_ns for path in (out / AUTO_DIR / LOG_DIR).glob("*.log")}
    assert run_auto_recipe(config, photos, out, resume="latest") == rows
    printed = capsys.readouterr().out
    assert "recipe double_lr failed in an earlier run" in printed and "recipe base finished in an earlier run" in printed
    assert {path: path.stat().st_mtime_ns for path in logs} == logs  # no recipe process ran again


def _search_args(config_file: str, photos: str, out: str) -> list[str]:
    return ["--config", config_file, "-d", photos, "-o", out, "--auto_recipe", "--auto_recipes",
            *RECIPES, "--auto_devices", "cpu,cpu", "--auto_budget", "18", "--no_prior_preservation", "--train_step",
            "6", "--validation_steps", "3", "--validation_face_backend", "none", "--checkpointing_steps", "100"]


def _training(folder: Path) -> bool:
    """Whether the recipe in `folder` has logged a training step and not finished."""
    log = folder / LOG_DIR / LOG_FILE
    if (folder / META_FILE).exists() or not log.is_file():
        return False
    return any(json.loads(line).get("step", 0) >= 1 for line in log.read_text().splitlines() if line.endswith("}"))


def _files(folder: Path) -> dict[str, tuple[int, str]]:
    return {str(path.relative_to(folder)): (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.slow
def test_a_parallel_search_stopped_mid_recipe_resumes_without_retraining_finished_ones(
        tiny_config, tiny_config_file, photos, tmp_path):
    """Also the serial search's table and winner from recipe processes (--auto_devices cpu,cpu), and relative paths
    (config, photos, -o) that mean to the recipe processes what they mean where the search was started."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the device processes compute as the serial reference (one thread)
    out = tmp_path / "stopped" / "girl1"
    work = out / AUTO_DIR
    (tmp_path / "config.py").write_text(tiny_config_file.read_text())
    args = _search_args("config.py", str(photos.relative_to(tmp_path)), "stopped/girl1")
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "train.py"), *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    # double_lr starts when base or vera has finished: stop while it trains
    _, err = stop_when(process, lambda: _training(work / "double_lr"), "double_lr's training", seconds=600)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and not (out / ".lock").exists(), err
    [stopped] = [line for line in err.splitlines() if line.startswith("stopped: ")]
    assert "double_lr" in stopped and "stopped at a checkpoint" in stopped, stopped
    assert not (work / "double_lr" / META_FILE).exists() and list((work / "double_lr").glob("checkpoints/*"))
    finished = {name: _files(work / name) for name in RECIPES if (work / name / META_FILE).exists()}
    assert finished and "double_lr" not in finished
    logs = {name: (work / LOG_DIR / f"{name}.log").stat().st_mtime_ns for name in finished}

    command = shlex.split(stopped.split("continue with: ", 1)[1])  # the command it printed, as given
    assert command[0] == "python" and command[-2:] == ["--resume", "latest"]
    done = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for name, before in finished.items():
        assert f"recipe {name} finished in an earlier run" in done.stdout and "reused" in done.stdout
        after = _files(work / name)
        assert {path: before[path] for path in after} == after  # nothing rewritten; only a loser's adapters go
        assert (work / LOG_DIR / f"{name}.log").stat().st_mtime_ns == logs[name]  # no process ran it again

    reference = tmp_path / "reference" / "girl1"
    config = deepcopy(tiny_config)
    config.train.update(with_prior_preservation=False, train_step=6, validation_steps=3, auto_recipe=True,
                        auto_recipes=RECIPES, auto_budget=18, validation_face_backend="none", checkpointing_steps=100)
    run_auto_recipe(config, photos, reference)
    assert (work / TABLE_FILE).read_text() == (reference / AUTO_DIR / TABLE_FILE).read_text()
    assert {path.name for path in (work / LOG_DIR).glob("*.log")} == {f"{name}.log" for name in RECIPES}
    winner = json.loads((out / META_FILE).read_text())["auto_recipe"]["winner"]
    assert winner == json.loads((reference / META_FILE).read_text())["auto_recipe"]["winner"]
    assert (out / TOKEN_FILE).read_bytes() == (reference / TOKEN_FILE).read_bytes()


# --- the device processes and a stop signal (libs/devices.py), with plain Python processes --------------------

# a job that writes its marker, then stops on the first SIGTERM or SIGINT (exit 128 + the signal, as train.py)
# or, with `patient`, only on the second (as a run that finishes its step first)
JOB = """import signal, sys, time
from pathlib import Path
patient = {patient}
def stop(signum, frame):
    global patient
    if patient:
        patient = False
        Path({marker!r}).with_suffix(".first").write_text("")
        return
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
Path({marker!r}).write_text("")
while True:
    time.sleep(0.05)
"""


def _jobs(tmp_path: Path, patient: bool) -> list[Job]:
    return [Job(name, [sys.executable, "-c", JOB.format(patient=patient, marker=str(tmp_path / f"{name}.started"))],
                tmp_path / f"{name}.log") for name in ("first", "second")]


def _signal_when(path: Path, signums: list[int]) -> threading.Thread:
    def send() -> None:
        while not path.exists():
            time.sleep(0.02)
        for signum in signums:
            os.kill(os.getpid(), signum)
            time.sleep(0.3)
    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_is_passed_on_to_the_running_job_and_no_further_job_starts(tmp_path, signum):
    jobs = _jobs(tmp_path, patient=False)
    with StopSignals("hint") as stop:
        _signal_when(tmp_path / "first.started", [signum])
        failures = run_on_devices(jobs, ["cpu"], stop)
    assert stop.requested == signum
    assert [(f.job.name, f.returncode) for f in failures] == [("first", 128 + signum)]
    assert not (tmp_path / "second.log").exists() and not (tmp_path / "second.started").exists()


def test_a_second_signal_is_passed_on_too_and_stops_the_wait(tmp_path):
    jobs = _jobs(tmp_path, patient=True)
    with StopSignals("finished recipes are kept") as stop:
        _signal_when(tmp_path / "first.started", [signal.SIGTERM, signal.SIGTERM])
        with pytest.raises(Interrupted, match="SIGTERM received; finished recipes are kept"):
            run_on_devices(jobs, ["cpu"], stop)
    assert (tmp_path / "first.first").exists()  # the job saw the first signal, and ended on the second
    assert not (tmp_path / "second.started").exists()
