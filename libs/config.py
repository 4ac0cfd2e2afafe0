"""Config loading: `ml_collections` files in configs/, selected by name or path, overridable from flags."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Mapping

import ml_collections

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_CONFIG = "unidiffuser_v1"


def load_config(name_or_path: str = DEFAULT_CONFIG) -> ml_collections.ConfigDict:
    """Load `configs/<name>.py` (or any .py file) and return its `get_config()`."""
    path = Path(name_or_path)
    if path.suffix != ".py":
        path = CONFIG_DIR / f"{name_or_path}.py"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem != "__init__"))
        raise FileNotFoundError(f"config {name_or_path!r} not found ({path}); known configs: {known}")
    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module.get_config()


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Set dotted keys (`sample.steps`) from command-line values; `None` means "not given"."""
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = config
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise KeyError(f"unknown config key {dotted!r}")
        node[leaf] = value
    return config


def resolve_path(path: str | Path) -> Path:
    """Relative model paths in configs are relative to the repository root, not the working directory."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path
