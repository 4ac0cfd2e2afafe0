"""Run an entry script or tool in this process exactly as its `if __name__ == "__main__"` line does (through
libs.errors.run_cli), and return its exit status."""
from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Sequence

from libs.config import REPO_ROOT
from libs.errors import run_cli


def run_entry(module: ModuleType, argv: Sequence[str]) -> int:
    """`module.main(module.parse_args(argv))` at the command-line edge; 0 when it returns."""
    try:
        run_cli(lambda: module.main(module.parse_args([str(a) for a in argv])))
    except SystemExit as exit_info:
        return exit_info.code if isinstance(exit_info.code, int) else 1
    return 0


def script_repo(root: Path, scripts: Sequence[str] = ("train.py", "train.sh")) -> Path:
    """A repository layout in `root` for running a shell entry script from elsewhere: the scripts copied (they
    find their folder from their own path), libs/ and configs/ linked."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("libs", "configs"):
        (root / name).symlink_to(REPO_ROOT / name)
    for name in scripts:
        (root / name).write_bytes((REPO_ROOT / name).read_bytes())
        (root / name).chmod(0o755)
    return root
