"""Stopping on SIGTERM / SIGINT (a cluster scheduler, a spot instance, `docker stop`, Ctrl-C) without losing work.

`with StopSignals(hint) as stop:` turns either signal into `libs.errors.Interrupted` (exit 128 + signal through
run_cli), so `finally` blocks run: locks are released, temporary files removed, a background checkpoint write
completes. While `stop.deferring` (the training steps) the first signal only sets `stop.requested`: the
loop finishes the step it is in (and a validation that has started), writes a checkpoint and raises
`Interrupted` itself, saying how to resume. A second signal stops at once (the last complete checkpoint stays:
checkpoints are renamed into place only when whole).
"""
from __future__ import annotations

import shlex
import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import Sequence

from libs.errors import Interrupted

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """SIGTERM and SIGINT handlers for the block (the main thread only; elsewhere Python's defaults stay)."""

    def __init__(self, hint: str) -> None:
        self.hint = hint  # what the message of an immediate stop says to do next
        self.requested: int | None = None
        self.deferring = False  # while True, a first signal is only recorded: the code checks `requested` itself
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.deferring and self.requested is None:
            self.requested = signum
            print(f"\n{name} received: finishing this step, writing a checkpoint, then stopping "
                  f"(send {name} again to stop at once)", file=sys.stderr, flush=True)
            return
        raise Interrupted(f"{name} received; {self.hint}", signum)


def resume_command(argv: Sequence[str] | None = None) -> str:
    """The command line that continues this run: the same arguments plus `--resume latest`."""
    argv = list(sys.argv if argv is None else argv)
    if "--resume" not in argv and not any(arg.startswith("--resume=") for arg in argv):
        argv += ["--resume", "latest"]
    return "python " + shlex.join(argv)
