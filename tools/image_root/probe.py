"""Run INSIDE the clean root by the image check, with the image's Python (standard library only):

    python probe.py imports MODULE...   every module imported, each failure named with its missing shared library
    python probe.py ldd MODULE          the shared libraries the module's binaries link (ldd), unresolved ones marked

Prints one line `PROBE-RESULT <json>` on stdout (modules may print too); the host (tools/image_root/checks.py)
judges it.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import re
import subprocess
import sys
import traceback
from pathlib import Path

RESULT_PREFIX = "PROBE-RESULT "
MISSING_LIBRARY = re.compile(r"(lib[\w.+-]*\.so[\w.]*): cannot open shared object file")


def missing_library(message: str) -> str | None:
    """The shared library an ImportError (or ldd) says it could not load, e.g. 'libxcb.so.1'."""
    found = MISSING_LIBRARY.search(message)
    return found.group(1) if found else None


def check_imports(modules: list[str]) -> list[dict]:
    """Each module imported in turn (a failure does not stop the others: SystemExit included, as rembg exits)."""
    results = []
    for module in modules:
        try:
            importlib.import_module(module)
            results.append({"module": module, "ok": True})
        except BaseException as error:  # noqa: BLE001 - every way an import can fail is a finding here
            message = f"{type(error).__name__}: {error}"
            results.append({"module": module, "ok": False, "error": message,
                            "missing_library": missing_library(message),
                            "traceback": "".join(traceback.format_exception(error))[-2000:]})
    return results


def module_binaries(module: str) -> list[str]:
    """The compiled extension files of a package (found without importing it: the import may be what fails)."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        return []
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        return [spec.origin] if spec.origin.endswith(".so") else []
    return sorted(str(path) for folder in folders for path in Path(folder).rglob("*.so"))


def linked_libraries(module: str) -> dict:
    """ldd of each binary of `module`: {binary: {library: resolved path or None}}."""
    linked = {}
    for binary in module_binaries(module):
        output = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
        libraries = {}
        for line in output.splitlines():
            name, arrow, target = line.strip().partition(" => ")
            if arrow:
                libraries[name] = None if target.startswith("not found") else target.split(" (")[0]
        linked[binary] = libraries
    return {"module": module, "binaries": linked}


if __name__ == "__main__":
    command, *names = sys.argv[1:]
    if command == "imports":
        print(RESULT_PREFIX + json.dumps(check_imports(names)))
    elif command == "ldd":
        print(RESULT_PREFIX + json.dumps(linked_libraries(names[0])))
    else:
        raise SystemExit(f"unknown command {command!r} (see the docstring)")
