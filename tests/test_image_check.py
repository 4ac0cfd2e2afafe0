"""The submission image proven without Docker (tools/image_check.py, `make image-check`).

Fast: the Dockerfile/.dockerignore reading, the cache key, the runtime import list against the code's imports,
and the dependency set (only the headless OpenCV). Slow, and only as root with mmdebstrap (CI): the clean root
itself -- cv2 imports and links no X/OpenGL library, the organizers' flow runs offline, and a GUI OpenCV put
into the root on purpose is caught, naming the library."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import sys
from pathlib import Path

import pytest

from libs.config import REPO_ROOT
from libs.errors import UserError
from libs.locks import FolderLock
from tools.image_root.checks import (DEV_ONLY_MODULES, RUNTIME_MODULES, check_runtime, gui_links, import_problems,
                                     run_probe)
from tools.image_root.dockerfile import DockerIgnore, Instruction, context_files, parse_dockerfile
from tools.image_root.probe import missing_library
from tools.image_root.root import (CACHE_DIR, Root, copy_plan, dependency_steps, host_problems, install_sources,
                                   layer_key)

TORCH_SPEC = re.search(r"^TORCH_SPEC \?= (.+)$", (REPO_ROOT / "Makefile").read_text(), re.MULTILINE).group(1)


def _requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(re.split(r"[\[<>=!~;\s]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


# --- what docker build would do ------------------------------------------------------------------

def test_dockerignore_follows_dockers_rules():
    ignore = DockerIgnore("# comment\nmodels/\n**/__pycache__\n*.log\n!keep.log\ndocs/*.md\n/outputs\n")
    assert ignore.ignored("models") and ignore.ignored("models/uvit_v1.pth")
    assert not ignore.ignored("libs/models/uvit.py")  # anchored at the context root
    assert ignore.ignored("__pycache__/a.pyc") and ignore.ignored("libs/x/__pycache__/a.pyc")
    assert ignore.ignored("a.log") and not ignore.ignored("keep.log") and not ignore.ignored("sub/a.log")
    assert ignore.ignored("docs/a.md") and not ignore.ignored("docs/sub/a.md") and not ignore.ignored("docs/a.txt")
    assert ignore.ignored("outputs/boy1/0-000.jpg")


def test_the_build_context_of_this_repository(tmp_path):
    project = tmp_path / "project"
    for name in ("Dockerfile", ".dockerignore", "sample.sh"):
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO_ROOT / name, project / name)
    for name in ("libs/models/uvit.py", "models/uvit_v1.pth", "train_data/boy1/a.jpg", "model_output/boy1/x.json",
                 "build/submission/models/clip/config.json", "libs/__pycache__/a.pyc", ".git/HEAD", "outputs/a.jpg"):
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text("x")
    files = context_files(project)
    assert files == sorted([".dockerignore", "Dockerfile", "build/submission/models/clip/config.json",
                            "libs/models/uvit.py", "model_output/boy1/x.json", "sample.sh"])


def test_the_dockerfile_is_replayed_step_by_step(tmp_path):
    instructions = parse_dockerfile(REPO_ROOT / "Dockerfile")
    assert instructions[0].keyword == "FROM" and "runtime" in instructions[0].argument
    cached = instructions[1:dependency_steps(instructions)]
    assert cached[-1].keyword == "RUN" and "requirements.txt" in cached[-1].argument
    assert "--no-deps -r requirements-nodeps.txt" in cached[-1].argument
    assert not any(i.keyword == "COPY" and i.argument.startswith(". ") for i in cached)  # the code is not cached
    copy = next(i for i in cached if i.keyword == "COPY")
    plan = copy_plan(copy, REPO_ROOT, context_files(REPO_ROOT), "/workspace")
    assert [target for _, target in plan] == ["/workspace/requirements.txt", "/workspace/requirements-nodeps.txt"]
    (tmp_path / "Dockerfile").write_text("FROM x\nRUN a \\\n  && b\nADD x y\n")
    with pytest.raises(UserError, match=r"Dockerfile:4: ADD is not replayed"):
        parse_dockerfile(tmp_path / "Dockerfile")
    (tmp_path / "Dockerfile").write_text("FROM x\nENV P=${Q:-1}\n")
    with pytest.raises(UserError, match=r"Dockerfile:2: ENV uses a \$\{VAR:...\} form"):
        parse_dockerfile(tmp_path / "Dockerfile")
    root = Root(tmp_path)
    for line in ('ARG SAMPLE_ARGS=""', 'ARG B="--x 1"', 'ENV A="${SAMPLE_ARGS}" C=$B/c', "WORKDIR /w", "WORKDIR $C"):
        keyword, _, argument = line.partition(" ")
        root.replay_state(Instruction(keyword, argument, 1))
    assert root.env["A"] == "" and root.env["C"] == "--x 1/c" and root.workdir == "/w/--x 1/c"


def test_the_cached_root_follows_what_the_install_reads(tmp_path):
    """Rebuilt when requirements*.txt, the install steps or the torch wheel change; not when the code does."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("Dockerfile", ".dockerignore", "requirements.txt", "requirements-nodeps.txt", "sample.py"):
        shutil.copy(REPO_ROOT / name, project / name)

    def key() -> str:
        return layer_key(parse_dockerfile(project / "Dockerfile"), project, context_files(project), TORCH_SPEC)

    first = key()
    (project / "sample.py").write_text("# changed\n")
    assert key() == first
    (project / "requirements-nodeps.txt").write_text("insightface==2.1\n")
    second = key()
    assert second != first
    dockerfile = (project / "Dockerfile").read_text()
    (project / "Dockerfile").write_text(dockerfile.replace("pip install -r requirements.txt",
                                                          "pip install -U -r requirements.txt"))
    assert key() not in (first, second)
    assert layer_key(parse_dockerfile(project / "Dockerfile"), project, context_files(project), "torch==2.4.0") != key()


# --- what the root must import ------------------------------------------------------------------

def _third_party_imports() -> dict[str, str]:
    """Top-level third-party modules imported anywhere in the image's code (entry scripts, libs/, configs/, tools/)."""
    found = {}
    files = [*REPO_ROOT.glob("*.py"), *(p for d in ("libs", "configs", "tools") for p in (REPO_ROOT / d).rglob("*.py"))]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("libs", "tools", "configs", "__future__"):
                    found.setdefault(top, str(path.relative_to(REPO_ROOT)))
    return found


def test_the_runtime_import_list_covers_the_code():
    listed = {module.split(".")[0] for module in RUNTIME_MODULES} | set(DEV_ONLY_MODULES)
    missing = {module: where for module, where in _third_party_imports().items() if module not in listed}
    assert not missing, f"add these to RUNTIME_MODULES in tools/image_root/checks.py: {missing}"


def test_a_failed_import_names_the_missing_library():
    message = "ImportError: libxcb.so.1: cannot open shared object file: No such file or directory"
    assert missing_library(message) == "libxcb.so.1"
    assert missing_library("ModuleNotFoundError: No module named 'rembg'") is None
    problems = import_problems([{"module": "numpy", "ok": True},
                                {"module": "cv2", "ok": False, "error": message, "missing_library": "libxcb.so.1"},
                                {"module": "rembg", "ok": False, "error": "SystemExit: 1", "missing_library": None}])
    assert problems == ["import cv2 fails in the clean root: missing shared library libxcb.so.1",
                        "import rembg fails in the clean root: SystemExit: 1"]
    ldd = {"binaries": {"/x/cv2/cv2.abi3.so": {"libz.so.1": "/lib/libz.so.1", "libxcb.so.1": None,
                                                "libGL.so.1": None, "libglib-2.0.so.0": None,
                                                "libgomp.so.1": "/lib/libgomp.so.1"}}}
    assert gui_links(ldd) == ["cv2.abi3.so: libxcb.so.1", "cv2.abi3.so: libGL.so.1", "cv2.abi3.so: libglib-2.0.so.0"]


# --- the dependency set -------------------------------------------------------------------------

def test_only_the_headless_opencv_is_asked_for():
    """insightface declares the GUI opencv-python: it is installed without its dependencies, and everything else
    it declares is asked for by requirements.txt (what the image installs with dependencies)."""
    runtime = _requirement_names(REPO_ROOT / "requirements.txt")
    nodeps = _requirement_names(REPO_ROOT / "requirements-nodeps.txt")
    assert "opencv-python-headless" in runtime and "opencv-python" not in runtime | nodeps
    assert "insightface" in nodeps and "insightface" not in runtime
    declared = {re.split(r"[\[<>=!~;\s(]", r, maxsplit=1)[0].lower().replace("_", "-")
                for r in importlib.metadata.requires("insightface") or [] if "extra ==" not in r}
    assert "opencv-python" in declared  # why it is installed with --no-deps
    assert declared - {"opencv-python"} <= runtime, declared - runtime
    for text in ((REPO_ROOT / "Dockerfile").read_text(), (REPO_ROOT / "Makefile").read_text()):
        assert "--no-deps -r requirements-nodeps.txt" in text


def test_this_environment_has_no_gui_opencv():
    """What `make setup` leaves: one OpenCV, the headless build (the GUI one would overwrite its cv2/)."""
    installed = {dist.metadata["Name"].lower() for dist in importlib.metadata.distributions()}
    assert "opencv-python-headless" in installed
    assert "opencv-python" not in installed, "run `make setup` (it replaces the GUI opencv-python)"


# --- in the clean root (root and mmdebstrap: CI) ----------------------------------------------------

needs_root = pytest.mark.skipif(bool(host_problems()), reason="the clean-root image check "
                                f"cannot run here: {'; '.join(host_problems())}")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from tools.image_root.check import replay_image

    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with FolderLock(CACHE_DIR, "tests/test_image_check.py"):  # as tools/image_check.py holds it
        yield replay_image(REPO_ROOT, tmp_path_factory.mktemp("image_check"), CACHE_DIR, TORCH_SPEC)


@pytest.mark.slow
@needs_root
def test_cv2_imports_in_the_clean_root_and_links_no_gui_library(image):
    imported = run_probe(image.root, "imports", "cv2")
    assert imported[0]["ok"], imported
    ldd = run_probe(image.root, "ldd", "cv2")
    assert ldd["binaries"], "no cv2 binary in the root"
    linked = {library for libraries in ldd["binaries"].values() for library in libraries}
    assert "libstdc++.so.6" in linked  # ldd really listed the binary's libraries
    assert gui_links(ldd) == []


@pytest.mark.slow
@needs_root
def test_every_runtime_import_works_in_the_clean_root(image):
    assert check_runtime(image.root, image.files, print) == []


@pytest.mark.slow
@needs_root
def test_the_organizers_flow_runs_offline_in_the_clean_root(image):
    from tools.image_root.flow import run_grader_flow

    flow = run_grader_flow(image.root, image.mounts, image.work)
    assert flow.problems() == []
    assert len(flow.parameter_lines) == 8 and flow.printed_sum == sum(flow.parameter_lines) > 0
    assert flow.score_dict and flow.network == ""


@pytest.mark.slow
@needs_root
def test_a_gui_opencv_in_the_root_is_caught_naming_the_library(image, tmp_path):
    broken = image.fork(tmp_path / "gui_opencv")
    binds, env = install_sources(CACHE_DIR)
    done = broken.run("pip install --no-deps --force-reinstall opencv-python", binds=binds, env=env, network=True)
    assert done.returncode == 0
    problems = check_runtime(broken, image.files, print)
    assert any(p.startswith("import cv2 fails") and "libxcb.so.1" in p for p in problems), problems
    assert any(p.startswith("import insightface.app fails") for p in problems), problems
    assert any("cv2 links X/OpenGL libraries" in p and "libxcb.so.1" in p for p in problems), problems
    # the image under the fork is untouched: what the install replaced still imports and links no GUI library there
    # (every import of the untouched image: test_every_runtime_import_works_in_the_clean_root)
    untouched = run_probe(image.root, "imports", "cv2", "insightface.app")
    assert all(result["ok"] for result in untouched), untouched
    assert gui_links(run_probe(image.root, "ldd", "cv2")) == []
