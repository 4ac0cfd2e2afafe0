"""Runs spread over devices (libs/devices.py): the device list is checked before anything runs, jobs run on every
device; the helpers that run train.sh. `train.sh --devices cpu,cpu` writing the serial train.sh's personalizations
(through a stop and a failing subject) is tests/test_multiprocess_stop.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import train
from entrypoints import run_entry, script_repo
from libs.layout import training_runs
from libs.devices import DeviceError, Job, parse_devices, run_on_devices


def test_a_device_list_names_devices_that_exist():
    assert parse_devices("cpu, cpu") == ["cpu", "cpu"]
    for bad in ("gpu7", "", "cpu,tpu"):
        with pytest.raises(DeviceError, match="device list"):
            parse_devices(bad)


def test_jobs_run_on_every_device_and_failures_are_returned_in_order(tmp_path):
    jobs = [Job(f"job{i}", [sys.executable, "-c", f"import sys, os; print(os.environ['CUDA_VISIBLE_DEVICES'] == ''); "
                                              f"sys.exit({1 if i in (1, 3) else 0})"], tmp_path / f"job{i}.log")
            for i in range(5)]
    failures = run_on_devices(jobs, ["cpu", "cpu"])
    assert [(f.job.name, f.returncode) for f in failures] == [("job1", 1), ("job3", 1)]
    assert all(job.log.read_text().splitlines()[-1] == "True" for job in jobs)  # cpu processes see no GPU


def train_sh_env() -> dict[str, str]:
    """train.sh's environment in the tests: this venv's accelerate, toy-sized ops on one thread."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE": str(Path(sys.executable).parent / "accelerate")}


def run_train_sh(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(repo / "train.sh"), *args], cwd=repo.parent, capture_output=True, text=True,
                          env=train_sh_env(), timeout=900)


def test_train_sh_refuses_an_unknown_device_before_training(tmp_path, tiny_config_file):
    repo = script_repo(tmp_path / "repo")
    done = run_train_sh(repo, "--devices", "gpu7", "--config", str(tiny_config_file))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")] == [
        "error: device list 'gpu7': unknown device 'gpu7': use cpu, cuda or cuda:N"]
    assert not (repo / "model_output").exists()


def train_serially(repo: Path, *args: str) -> None:
    """What the serial train.sh writes for `args`, trained in this process: train.py with the arguments train.sh
    gives it (fp16 as `accelerate launch --mixed_precision fp16`, no class set, --resume latest). train.sh's serial
    loop itself runs as a process in tests/test_train.py::test_train_sh_runs_the_four_subjects_in_order."""
    for run in training_runs(repo):
        _, _, data, out = run.split(":")
        assert run_entry(train, ["-d", data, "-o", out, "--no_prior_preservation", "--resume", "latest", *args,
                                 "--mixed_precision", "fp16"]) == 0
