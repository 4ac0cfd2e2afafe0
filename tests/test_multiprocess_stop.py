"""Several training processes: `train.sh --devices cpu,cpu` (#20) writes the serial train.sh's personalizations,
with per-subject logs, every subject running to its end when one fails; a stop signal to train.sh (#24) reaches
every subject in training (through accelerate, to train.py), each finishes its step and writes its checkpoint, no
further subject starts, and train.sh exits 143 saying how to continue, and a rerun continues exactly; a signal to
one rank of a distributed run stops every rank after the same step."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from entrypoints import script_repo
from libs.config import REPO_ROOT
from libs.layout import SUBJECTS
from libs.train_output import CHECKPOINT_STATE, META_FILE, TOKEN_FILE, UVIT_LORA_FILE, list_checkpoints
from test_devices import run_train_sh, train_serially, train_sh_env
from conftest import logged_step, stop_when

STEPS = 30


def subjects_repo(root: Path, public_photos) -> Path:
    repo = script_repo(root)
    for name in SUBJECTS:
        (repo / "train_data" / name).mkdir(parents=True)
        public_photos["astronaut"].save(repo / "train_data" / name / "a.jpg")
    return repo


def training_processes(repo: Path) -> list[psutil.Process]:
    """train.py processes started from `repo` that are still alive."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        command = process.info["cmdline"] or []
        if any(part.endswith("train.py") for part in command) and str(repo) in " ".join(command) + str(
                _cwd(process)):
            found.append(process)
    return found


def _cwd(process: psutil.Process) -> str:
    try:
        return process.cwd()
    except (psutil.Error, OSError):
        return ""


@pytest.mark.slow
def test_train_sh_devices_ends_with_the_serial_personalizations_through_a_stop_and_a_failure(
        tmp_path, tiny_config_file, public_photos, fresh_accelerate_state):
    """`train.sh --devices cpu,cpu`, one subject's photo unreadable: SIGTERM to train.sh alone stops every subject in
    training (each checkpoints; none starts after; exit 143, how to continue); the rerun continues them, the
    unreadable subject fails naming itself while the others finish; after the fix the last rerun trains it alone.
    The four personalizations equal those of an uninterrupted serial train.sh, bitwise, each with its log."""
    settings = ["--config", str(tiny_config_file), "--train_step", str(STEPS), "--checkpointing_steps", "1000",
                "--log_every", "1"]
    common = ["--devices", "cpu,cpu", *settings]
    reference = subjects_repo(tmp_path / "reference", public_photos)
    train_serially(reference, *settings)  # the serial loop's own process: tests/test_train.py

    repo = subjects_repo(tmp_path / "stopped", public_photos)
    outputs = repo / "model_output"
    broken = repo / "train_data" / "girl1" / "a.jpg"
    good = broken.read_bytes()
    broken.write_bytes(b"not an image")
    process = subprocess.Popen([str(repo / "train.sh"), *common], cwd=repo.parent, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=train_sh_env())
    # SIGTERM to train.sh alone, once one subject per device is in training
    out, err = stop_when(process, lambda: min(logged_step(outputs / name) for name in SUBJECTS[:2]) >= 2,
                         "the first subjects' step 2")
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "run the same ./train.sh command again" in err, err
    assert "Traceback" not in err
    assert not training_processes(repo), "a training process outlived train.sh"
    stopped = []
    for name in SUBJECTS:
        folder = outputs / name
        if (folder / META_FILE).is_file() or not (folder / "logs" / "train_log.jsonl").is_file():
            continue  # finished before the signal, or never started
        [checkpoint] = list_checkpoints(folder)
        assert json.loads((checkpoint / CHECKPOINT_STATE).read_text())["step"] < STEPS
        assert not (folder / ".lock").exists()
        log = (folder / "logs" / "train_sh.log").read_text()
        assert "stopped: SIGTERM at step" in log, log[-2000:]
        stopped.append(name)
    assert stopped, out
    assert not (outputs / SUBJECTS[-1] / META_FILE).exists()  # no subject was started after the signal

    failed = run_train_sh(repo, *common)  # girl1 fails, the three others finish (the stopped ones continued)
    assert failed.returncode == 1
    assert "training girl1 failed on cpu" in failed.stderr and "cannot read image" in failed.stderr
    assert all((outputs / name / META_FILE).is_file() for name in SUBJECTS if name != "girl1")
    broken.write_bytes(good)
    again = run_train_sh(repo, *common)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("=== ") == 2 * len(SUBJECTS)  # start and done per subject
    for name in SUBJECTS:
        log = outputs / name / "logs" / "train_sh.log"
        assert log.is_file() and ("nothing to resume" in log.read_text()) == (name != "girl1")
        for file in (UVIT_LORA_FILE, TOKEN_FILE):
            assert (outputs / name / file).read_bytes() == (reference / "model_output" / name / file).read_bytes(), \
                (name, file)


@pytest.mark.slow
def test_a_signal_to_one_rank_of_a_distributed_run_stops_every_rank_after_the_same_step(tiny_config_file, photos,
                                                                                      tmp_path):
    """Two CPU processes (torchrun, gloo: accelerate's own launcher starts CPU ranks only through mpirun): SIGTERM to
    rank 1 alone; libs/stopping.py's flag is summed over the ranks after every step, so both stop after the same
    one, and rank 0 writes that step's checkpoint."""
    out = tmp_path / "run"
    command = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", str(REPO_ROOT / "train.py"),
               "--config", str(tiny_config_file), "-d", str(photos), "-o", str(out), "--no_prior_preservation",
               "--train_step", "400", "--checkpointing_steps", "1000", "--log_every", "1"]
    env = {**train_sh_env(), "ACCELERATE_USE_CPU": "1"}
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)
    def to_rank_1() -> None:
        [rank1] = [child for child in psutil.Process(process.pid).children(recursive=True)
                   if child.environ().get("RANK") == "1"]
        rank1.send_signal(signal.SIGTERM)

    _, err = stop_when(process, lambda: logged_step(out) >= 3, "step 3", send=to_rank_1)
    steps = re.findall(r"stopped: SIGTERM at step (\d+) of 400", err)
    assert len(steps) == 2 and steps[0] == steps[1], err[-3000:]  # each rank says it stopped, after the same step
    [checkpoint] = list_checkpoints(out)
    assert json.loads((checkpoint / CHECKPOINT_STATE).read_text())["step"] == int(steps[0])
    assert process.returncode != 0 and not (out / META_FILE).exists() and not (out / ".lock").exists()
