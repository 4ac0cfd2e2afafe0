"""The parent side of a parallel `--auto_recipe` search (`--auto_devices`): each recipe still to train runs as a
process of libs/train/recipe_worker.py on the first free device (libs/devices.py), exactly as the serial search
trains it, and what the processes leave is read back here, so that a parallel search records a diverged recipe,
stops and resumes as the serial one does:

    <out>/auto_recipe/logs/<recipe>.job.json     the job: the recipe's config, the photos, its folder
    <out>/auto_recipe/logs/<recipe>.log          the process's output
    <out>/auto_recipe/logs/<recipe>.failed.json  left by a recipe that diverged: {recipe: why}, failed.json's format
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Callable

import ml_collections

from libs.config import REPO_ROOT
from libs.devices import Failure, Job, log_tail, run_on_devices
from libs.errors import Interrupted
from libs.files import load_json
from libs.stopping import StopSignals, resume_command
from libs.train.plan import TrainingError
from libs.train_output import FAILED_FILE, LOG_DIR


def read_failures(path: Path) -> dict[str, str]:
    """A record of diverged recipes (auto_recipe/failed.json, or one recipe's from its process), checked before
    use; none yet is an empty record."""
    if not path.exists():
        return {}
    damaged = TrainingError(f"{path} is damaged (not a JSON record of failed recipes): delete it to train those "
                            "recipes again, or pass --overwrite to search again")
    failures = load_json(path, lambda error: damaged)
    if not isinstance(failures, dict) or not all(isinstance(v, str) for v in failures.values()):
        raise damaged
    return failures


def train_on_devices(todo: dict[str, tuple[ml_collections.ConfigDict, Path]], devices: list[str], data_dir: Path,
                     work: Path, mixed_precision: str | None, stop: StopSignals,
                     on_failed: Callable[[str, str], None]) -> None:
    """Train `todo` (recipe name -> its config and folder) over `devices`. A recipe that diverged goes to
    `on_failed(name, why)` (the search continues without it); a stop signal stops the recipes in training at a
    checkpoint and raises `Interrupted` with the command that continues; any other failure is raised once every
    recipe has ended (the others finish and are kept)."""
    from libs.train.recipe_worker import write_job  # the worker's module, run with -m: not imported with the package

    logs = work / LOG_DIR
    jobs = []
    for name, (config, folder) in todo.items():
        failed = _failure_record(logs, name)
        failed.unlink(missing_ok=True)  # one from an earlier run of this recipe is not this run's
        job_file = logs / f"{name}.job.json"
        write_job(job_file, config, data_dir.resolve(), folder.resolve(), failed.resolve(), mixed_precision)
        # run where this search runs (relative paths of the config and of -o mean the same), libs/ found by PYTHONPATH
        jobs.append(Job(name, [sys.executable, "-m", "libs.train.recipe_worker", str(job_file.resolve())],
                        logs / f"{name}.log", Path.cwd(),
                        {"PYTHONPATH": os.pathsep.join(filter(None, (str(REPO_ROOT), os.environ.get("PYTHONPATH"))))}))
    print(f"=== {len(jobs)} recipes on {len(devices)} devices ({', '.join(devices)}); each one's output in {logs}")
    failures = run_on_devices(jobs, devices, stop)
    others: list[Failure] = []
    for failure in failures:
        diverged = read_failures(_failure_record(logs, failure.job.name)).get(failure.job.name)
        if diverged is not None:
            on_failed(failure.job.name, diverged)
        elif stop.requested is None or failure.returncode not in _stopped_codes(stop.requested):
            others.append(failure)
    if stop.requested is not None:
        stopped = [f.job.name for f in failures if f.returncode in _stopped_codes(stop.requested)]
        raise Interrupted(f"{signal.Signals(stop.requested).name} received: the recipes in training "
                          f"({', '.join(stopped) or 'none'}) stopped at a checkpoint, finished recipes are kept; "
                          f"continue with: {resume_command()}", stop.requested)
    if others:
        first = others[0]
        more = f"; {len(others) - 1} more failed ({', '.join(f.job.name for f in others[1:])})" if others[1:] else ""
        raise TrainingError(f"recipe {first.job.name} failed on {first.device} (exit {first.returncode}){more}; the "
                            f"other recipes finished and are kept. The end of {first.job.log}:\n{log_tail(first.job.log)}\n"
                            "fix it, then rerun with --resume latest (finished recipes are not trained again)")


def _stopped_codes(signum: int) -> tuple[int, int]:
    """A recipe process's exit on the stop: 128 + signal from run_cli, or killed by it before it handled signals."""
    return 128 + signum, -signum


def _failure_record(logs: Path, recipe: str) -> Path:
    return logs / f"{recipe}.{FAILED_FILE}"
