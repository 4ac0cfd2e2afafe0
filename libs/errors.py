"""One error type for bad input, and the edge where every entry script and tool reports it.

A `UserError` is something the person running the command can fix (a missing file, a bad flag, a
folder in the way): it is printed as one `error: <message>` line on stderr and the process exits 2,
without a traceback. A full disk is treated the same way wherever it strikes. A run stopped by SIGTERM or
SIGINT (`Interrupted`) says how to continue and exits 128 + the signal's number. Anything else is a bug
and keeps its traceback.
"""
from __future__ import annotations

import errno
import sys
from typing import Callable, TypeVar

EXIT_USER_ERROR = 2
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
EXIT_INTERRUPTED = 130

T = TypeVar("T")


class UserError(Exception):
    """Bad input or a broken environment, with a message that says what, which file and how to fix it."""


class Interrupted(Exception):
    """A run stopped on a signal (libs.stopping) after keeping what resuming needs; the message says how."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def run_cli(main: Callable[[], T]) -> T:
    """Run an entry point; a `UserError` (or Ctrl-C) becomes a message and an exit status, not a traceback."""
    try:
        return main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
    except OSError as error:
        if error.errno not in DISK_FULL:
            raise
        print(f"error: no space left on the disk (writing {error.filename or 'a file'}); free space, then run the "
              "same command again: sampling continues with --skip_existing, training with --resume latest",
              file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
    except Interrupted as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
