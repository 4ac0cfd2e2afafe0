"""One rule for every program's output path, checked before any heavy work.

Every entry script, tool, bench and the demo calls `check_output_folder` on the folder it is about to write
into (the shell scripts through `python -m libs.outputs`). It refuses, with one message naming the output
path (never the source) and the fix:
- a path that is a file, or lies inside a file;
- a folder that cannot be written (no permission, a read-only mount);
- a full disk (no free block where the folder is or would be created);
- an existing non-empty folder whose contents this program did not write (`ours` says what it writes):
  nothing of a user's folder is replaced or mixed with a run's files.
Nothing is created here; the folder is made by the program's own writer (libs.locks for the claimed ones).
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from libs.errors import UserError, run_cli

# what any program may leave in its own folder: its lock and the temp files of its atomic writes
COMMON_ENTRIES = (".lock", ".*.tmp")
SHOWN = 5

Ours = Callable[[Path], bool]


class OutputPathError(UserError):
    """An output path that cannot take the program's output."""


def only(*patterns: str) -> Ours:
    """A folder is ours when every entry's name matches one of `patterns` (fnmatch) or COMMON_ENTRIES."""
    allowed = (*patterns, *COMMON_ENTRIES)
    return lambda folder: all(any(fnmatch.fnmatchcase(entry.name, p) for p in allowed) for entry in folder.iterdir())


def holding(marker: str) -> Ours:
    """A folder is ours when it holds `marker`, the record this program writes into every folder it makes."""
    return lambda folder: (folder / marker).exists()


def each(ours: Ours) -> Ours:
    """A folder of per-item folders (one per subject or class word) is ours when each of them is empty or ours."""
    return lambda folder: all(entry.is_dir() and (not any(entry.iterdir()) or ours(entry))
                              for entry in folder.iterdir()
                              if not any(fnmatch.fnmatchcase(entry.name, p) for p in COMMON_ENTRIES))


def nearest_existing(path: Path) -> Path:
    """`path` itself or its closest ancestor that exists (where a new folder would be created)."""
    for candidate in [path, *path.parents]:
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return Path(path.anchor or ".")


def check_output_folder(folder: str | Path, what: str = "output folder", ours: Ours | None = None) -> Path:
    """Refuse an output folder that cannot take this program's output (see the module docstring); returns it.

    `ours` recognizes an existing non-empty folder as this program's own (a resumed or repeated run);
    None means the program only adds files of its own names and never replaces a folder's contents."""
    folder = Path(folder)
    existing = nearest_existing(folder)
    if existing == folder and not folder.is_dir():
        raise OutputPathError(f"{what} {folder} is a file, not a folder: pick another path")
    if not existing.is_dir():
        raise OutputPathError(f"{what} {folder} cannot be created: {existing} is a file, not a folder; "
                              "pick another path")
    if not os.access(existing, os.W_OK | os.X_OK) or _read_only_mount(existing):
        why = "is on a read-only file system" if _read_only_mount(existing) else "does not let you write"
        where = "it" if existing == folder else f"{existing}, where it would be created,"
        raise OutputPathError(f"{what} {folder} is not writable: {where} {why}; pick a folder you can write to")
    if _free_bytes(existing) == 0:
        raise OutputPathError(f"{what} {folder}: no space left on the disk that holds {existing}; "
                              "free space, or pick a folder on another disk")
    if ours is not None and folder.is_dir() and any(folder.iterdir()) and not ours(folder):
        names = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in folder.iterdir())
        shown = ", ".join(names[:SHOWN]) + (f", ... ({len(names)} in all)" if len(names) > SHOWN else "")
        raise OutputPathError(f"{what} {folder} already holds files this program did not write ({shown}); "
                              "nothing was touched: pick a new or empty folder")
    return folder


def check_output_file(path: str | Path, what: str = "output file") -> Path:
    """The same rule for one file a program writes (its folder must take it; the path must not be a folder)."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{what} {path} is a folder: pick a file path")
    check_output_folder(path.parent, f"{what} {path}: its folder")
    return path


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _free_bytes(path: Path) -> int | None:
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m libs.outputs FOLDER --what ... [--only PATTERN ...]`: the same check for the shell scripts."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("folder")
    parser.add_argument("--what", default="output folder", help="how the message names the folder")
    parser.add_argument("--only", nargs="*", default=None,
                        help="entry names (fnmatch) that mark an existing folder as this program's own")
    args = parser.parse_args(argv)
    check_output_folder(args.folder, args.what, None if args.only is None else only(*args.only))


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
