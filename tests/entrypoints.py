"""Run an entry script or tool in this process exactly as its `if __name__ == "__main__"` line does (through
libs.errors.run_cli), and return its exit status."""
from __future__ import annotations

from types import ModuleType
from typing import Sequence

from libs.errors import run_cli


def run_entry(module: ModuleType, argv: Sequence[str]) -> int:
    """`module.main(module.parse_args(argv))` at the command-line edge; 0 when it returns."""
    try:
        run_cli(lambda: module.main(module.parse_args([str(a) for a in argv])))
    except SystemExit as exit_info:
        return exit_info.code if isinstance(exit_info.code, int) else 1
    return 0
