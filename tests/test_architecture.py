"""The layout's rules, checked on the source: imports over libs/ (in-function ones included) form no cycle,
sampling, scoring and the personalization reader import nothing from training, and docs/architecture.md
names only modules and symbols that exist."""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from libs.config import DEFAULT_CONFIG, REPO_ROOT, load_config

LIBS = REPO_ROOT / "libs"
ARCHITECTURE = REPO_ROOT / "docs" / "architecture.md"
NOT_FROM_TRAIN = ("libs.personalization", "libs.sample", "libs.score")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(LIBS.rglob("*.py"))}


def imported_modules(name: str) -> set[str]:
    """The libs modules `name` imports anywhere in its body (`from libs.x import y` counts libs.x.y when y is
    a module, else libs.x)."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("libs")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("libs"):
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {module for module in found if module in MODULES and module != name}


def unit(module: str) -> str:
    """The package (libs.train, libs.sample, ...) or flat module (libs.files) a module belongs to."""
    return ".".join(module.split(".")[:2])


GRAPH = {name: imported_modules(name) for name in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of the directed graph as a path that returns to its start, or [] when there is none."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_the_import_graph_sees_in_function_imports():
    assert "libs.sample.pipeline" in GRAPH["libs.class_images.sources"]  # imported inside a function
    assert "libs.train_output" in GRAPH["libs.personalization.reader"]


def test_no_import_cycle_between_modules():
    assert find_cycle(GRAPH) == []


def test_no_import_cycle_between_packages():
    packages: dict[str, set[str]] = {}
    for name, targets in GRAPH.items():
        packages.setdefault(unit(name), set()).update(unit(t) for t in targets if unit(t) != unit(name))
    assert find_cycle(packages) == []


@pytest.mark.parametrize("package", NOT_FROM_TRAIN)
def test_sampling_scoring_and_the_reader_import_nothing_from_training(package: str):
    wrong = {(name, target) for name, targets in GRAPH.items() if unit(name) == package
             for target in targets if unit(target) == "libs.train"}
    assert not wrong


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


# --- docs/architecture.md ------------------------------------------------------------------------

DOC = ARCHITECTURE.read_text(encoding="utf-8")
CITED_PATHS = sorted(set(re.findall(r"(?<![\w/])((?:libs|tools|bench|configs|tests)/[\w/.]*\w)", DOC)))
CITED_SYMBOLS = sorted(set(re.findall(r"`(libs(?:\.\w+)+)`", DOC)))
# `module.symbol` and `Class.method` pairs named in backticks (a module's last part, or a class of libs)
FILE_SUFFIXES = {"json", "jsonl", "py", "sh", "md", "jpg", "png", "csv", "html", "txt", "safetensors", "pt", "bin", "pth"}
CITED_PAIRS = sorted({pair for pair in re.findall(r"`([A-Za-z_]\w*)\.([A-Za-z_]\w*)`", DOC)
                      if pair[1] not in FILE_SUFFIXES})


def test_architecture_cites_paths_that_exist():
    assert CITED_PATHS, "the page names no path"
    missing = [path for path in CITED_PATHS if not (REPO_ROOT / path).exists()]
    assert not missing


def test_architecture_cites_modules_and_symbols_that_exist():
    missing = []
    for dotted in CITED_SYMBOLS:
        if dotted in MODULES:
            continue
        module, _, symbol = dotted.rpartition(".")
        if module not in MODULES or not hasattr(importlib.import_module(module), symbol):
            missing.append(dotted)
    assert not missing


def _owners(first: str) -> list[object]:
    """What `first` in `first.second` can name: a libs module with that last part, or a class in libs."""
    owners = [importlib.import_module(name) for name in MODULES if name.rsplit(".", 1)[-1] == first]
    for name in MODULES:
        module = importlib.import_module(name)
        if isinstance(getattr(module, first, None), type):
            owners.append(getattr(module, first))
    return owners


def test_architecture_cites_attributes_that_exist():
    """`config.<block>` is a block of the default config; `<module>.<name>` and `<Class>.<name>` exist in libs
    (a first part that is neither, like `torch.load`, names another library)."""
    config = load_config(DEFAULT_CONFIG)
    missing = [f"{first}.{second}" for first, second in CITED_PAIRS
               if (second not in config if first == "config"
                   else _owners(first) and not any(hasattr(owner, second) for owner in _owners(first)))]
    assert not missing


def test_every_libs_module_is_in_the_architecture_table():
    rows = "\n".join(line for line in DOC.splitlines() if line.startswith("| `libs/"))
    unlisted = [str(path.relative_to(REPO_ROOT)) for path in MODULES.values()
                if path.name != "__init__.py" and f"`{path.relative_to(REPO_ROOT)}`" not in rows]
    assert not unlisted
