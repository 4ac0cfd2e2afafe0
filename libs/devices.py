"""Training runs spread over devices, one process per device (`--auto_devices`, `train.sh --devices`).

A device list is `cuda:0,cuda:1,...` or, on a machine without GPUs, `cpu,cpu` (several CPU processes). Each
process sees only its device (CUDA_VISIBLE_DEVICES), so the code inside it is the one-device code: a run's
numbers do not depend on where it ran. Jobs are handed out in order to whichever device is free; every job
runs to its end even when another fails, and the failures are returned for the caller to report.

Stopping (libs/stopping.py): each job runs in its own session, so Ctrl-C in a terminal reaches only the parent,
which passes its first SIGTERM/SIGINT on to the running jobs once (each stops as a single run stops: after its
step, with a checkpoint), starts no further job and waits for them; a second signal is passed on too (they stop
at once, keeping their last complete checkpoint).

    python -m libs.devices cuda:0,cpu     prints "<device> <CUDA_VISIBLE_DEVICES value>" per device
                                                (train.sh reads it; a bad list is one `error:` line, exit 2)
"""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from libs.errors import Interrupted, UserError, run_cli
from libs.stopping import StopSignals


class DeviceError(UserError):
    """A device list naming a device this machine does not have."""


def parse_devices(text: str) -> list[str]:
    """`cuda:0,cuda:1` / `cpu,cpu` -> the device names, each one that exists here (a DeviceError otherwise)."""
    from libs.sample.pipeline import resolve_device

    names = [part.strip() for part in str(text).split(",")]
    if not any(names):
        raise DeviceError(f"device list {text!r} is empty: give e.g. cuda:0,cuda:1 or cpu,cpu")
    if not all(names):
        raise DeviceError(f"device list {text!r} has an empty item (two commas, or one at an end): give e.g. "
                          "cuda:0,cuda:1 or cpu,cpu")
    devices = []
    for name in names:
        try:
            device = resolve_device(name)
        except UserError as error:
            raise DeviceError(f"device list {text!r}: {error}") from error
        if device.type not in ("cpu", "cuda"):
            raise DeviceError(f"device list {text!r}: {name} is neither cpu nor cuda[:N]")
        devices.append("cpu" if device.type == "cpu" else f"cuda:{device.index or 0}")
    return devices


def visible_devices(device: str) -> str:
    """CUDA_VISIBLE_DEVICES for a process bound to `device`: its GPU index, or none for cpu."""
    return device.split(":", 1)[1] if device.startswith("cuda:") else ""


def device_environment(device: str, devices: Sequence[str]) -> dict[str, str]:
    """The environment of a process bound to `device`; CPU processes share the cores (unless OMP_NUM_THREADS
    is set already)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible_devices(device)}
    cpu_processes = sum(d == "cpu" for d in devices)
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, cpu_processes)))
    return env


@dataclass
class Job:
    name: str
    command: list[str]
    log: Path
    cwd: Path | None = None
    env: dict[str, str] | None = None  # set on top of the device's environment


@dataclass
class Failure:
    job: Job
    device: str
    returncode: int


def run_on_devices(jobs: Sequence[Job], devices: Sequence[str], stop: StopSignals | None = None) -> list[Failure]:
    """Run every job as a process on the first free device (its output into its log); returns the failures
    in job order. With `stop` (the caller's active StopSignals) a stop signal is passed on to the running jobs
    and no further job starts: the caller reads `stop.requested` once this returns."""
    todo: queue.Queue[int] = queue.Queue()
    for index in range(len(jobs)):
        todo.put(index)
    failures: dict[int, Failure] = {}
    running: dict[int, subprocess.Popen] = {}
    lock = threading.Lock()  # a job starts, or the stop is passed on, never both at once
    halted = threading.Event()

    def worker(device: str) -> None:
        while not halted.is_set():
            try:
                index = todo.get_nowait()
            except queue.Empty:
                return
            job = jobs[index]
            job.log.parent.mkdir(parents=True, exist_ok=True)
            with open(job.log, "w") as log:
                print(f"=== {job.name} on {device}: {' '.join(job.command)}", file=log, flush=True)
                with lock:
                    if halted.is_set():
                        return
                    running[index] = subprocess.Popen(job.command, stdout=log, stderr=subprocess.STDOUT, cwd=job.cwd,
                                                      env={**device_environment(device, devices), **(job.env or {})},
                                                      start_new_session=True)
                code = running[index].wait()
                with lock:
                    del running[index]
            if code != 0:
                failures[index] = Failure(job, device, code)

    def pass_on(signum: int) -> None:
        with lock:
            halted.set()
            for process in running.values():
                process.send_signal(signum)

    threads = [threading.Thread(target=worker, args=(device,), name=f"device-{device}") for device in devices]
    if stop is not None:
        stop.deferring = True  # a first signal is only recorded, and passed on by _wait
    try:
        for thread in threads:
            thread.start()
        _wait(threads, stop, pass_on)
    except BaseException as error:  # a second signal (or a bug): the jobs stop too, at once
        pass_on(error.signum if isinstance(error, Interrupted) else signal.SIGTERM)
        raise
    finally:
        if stop is not None:
            stop.deferring = False
        for thread in threads:
            if thread.ident is not None:  # started
                thread.join()
    return [failures[index] for index in sorted(failures)]


def _wait(threads: Sequence[threading.Thread], stop: StopSignals | None, pass_on: Callable[[int], None]) -> None:
    """Until every job has ended; a first stop signal arriving meanwhile goes on to the jobs once."""
    passed = False
    while any(thread.is_alive() for thread in threads):
        if stop is not None and stop.requested is not None and not passed:
            pass_on(stop.requested)
            passed = True
        time.sleep(0.1)


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a job's log (what a failure report shows)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def main(argv: Sequence[str]) -> None:
    """train.sh's check: one line per device, `<device> <CUDA_VISIBLE_DEVICES>`."""
    if len(argv) != 1:
        raise DeviceError("usage: python -m libs.devices <device>[,<device>...]")
    for device in parse_devices(argv[0]):
        print(device, visible_devices(device) or "-")


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
