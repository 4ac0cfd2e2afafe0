"""Claiming an output folder for one run: one writer per folder, and no debris when a run fails.

`train.py -o DIR` and `sample.py --output_path DIR` hold `DIR/.lock` for the whole run. A second run on the
same folder fails at once with the holder's pid, host and start time. A lock left by a process that died
(same host, pid gone) is taken over with a notice; a lock from another host is never guessed stale.
A folder the run created is removed again when the run fails before writing anything into it.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Iterator

from libs.errors import UserError
from libs.outputs import Ours, check_output_folder

LOCK_FILE = ".lock"


class FolderBusyError(UserError):
    """Another run is writing into the same output folder."""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class FolderLock:
    """`with FolderLock(folder, "train.py"):` — exclusive use of `folder` (created if needed) for the block."""

    def __init__(self, folder: str | Path, owner: str):
        self.folder = Path(folder)
        self.owner = owner
        self.path = self.folder / LOCK_FILE
        self._held = False

    def holder(self) -> dict | None:
        """What the lock file says about its holder (None when there is no readable lock)."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def acquire(self) -> "FolderLock":
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "owner": self.owner,
                             "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv})
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(record)
            self._held = True
            return self
        raise FolderBusyError(f"cannot lock {self.folder}: another run keeps taking it")

    def _take_over_if_stale(self) -> None:
        holder = self.holder()
        if holder is None:
            # being written this instant, or unreadable: give the writer a moment, then treat it as stale
            time.sleep(0.2)
            holder = self.holder()
        if holder is not None:
            same_host = holder.get("host") == socket.gethostname()
            pid = holder.get("pid")
            if not same_host or not isinstance(pid, int) or _process_alive(pid):
                raise FolderBusyError(
                    f"{self.folder} is in use by another run: {holder.get('owner', '?')} pid {pid} on "
                    f"{holder.get('host', '?')}, started {holder.get('started', '?')}; wait for it to finish, or use "
                    f"another folder (if that run is gone, delete {self.path})")
            print(f"notice: taking over the lock of {self.folder} from a run that no longer exists "
                  f"(pid {pid}, started {holder.get('started', '?')})", file=sys.stderr)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def release(self) -> None:
        if self._held:
            self._held = False
            holder = self.holder()
            if holder is None or holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()


def make_folder(folder: Path, what: str, ours: Ours | None = None) -> list[Path]:
    """Create `folder` (and missing parents) after libs.outputs' check; returns the folders it created,
    outermost first."""
    check_output_folder(folder, what, ours)
    missing = []
    for candidate in [folder, *folder.parents]:
        if candidate.exists():
            break
        missing.append(candidate)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # changed since the check
        raise UserError(f"cannot create {what} {folder}: {error.strerror or error}; pick a folder you can write to") from None
    return list(reversed(missing))


@contextmanager
def claimed_folder(folder: str | Path, owner: str, what: str = "output folder",
                   ours: Ours | None = None) -> Iterator[Path]:
    """Create and lock `folder` for the block (an existing one only when `ours` recognizes it, libs.outputs).
    If the block fails and the folder was created here and holds nothing else, it is removed again (with the
    parents created for it)."""
    folder = Path(folder)
    created = make_folder(folder, what, ours)
    lock = FolderLock(folder, owner)
    try:
        lock.acquire()
    except BaseException:
        _remove_if_empty(created)
        raise
    ok = False
    try:
        yield folder
        ok = True
    finally:
        lock.release()
        if not ok:
            _remove_if_empty(created)


def _remove_if_empty(created: list[Path]) -> None:
    for path in reversed(created):
        try:
            path.rmdir()
        except OSError:
            return
