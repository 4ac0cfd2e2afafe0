"""What the image check asserts inside the clean root: every runtime import works (a failure named with the
shared library it misses), and OpenCV is the headless build (its binary links no X or OpenGL library)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from tools.image_root import probe
from tools.image_root.root import HOST, Bind, Root

# third-party modules the entry scripts, libs/ and tools/ import at run time (tests/test_image_check.py checks
# this list against the code's imports); importing the submodule also imports its package
RUNTIME_MODULES = (
    "numpy", "PIL", "torch", "torch.utils.tensorboard", "safetensors.torch", "einops", "ml_collections", "tqdm",
    "huggingface_hub", "transformers", "transformers.utils", "diffusers",
    "diffusers.loaders.single_file_utils", "diffusers.models.autoencoders.vae", "peft", "accelerate",
    "matplotlib.pyplot", "cv2", "onnxruntime", "onnx", "insightface.app", "insightface.utils.face_align",
    "skimage.transform", "scipy", "rembg", "pooch",
)
# imported only by the optional offline face backend (requirements-dev.txt), never by the graded flow
DEV_ONLY_MODULES = ("dlib", "face_recognition_models")
# X11/XCB, OpenGL/EGL, GLib/GTK and Qt: what a GUI OpenCV links and the image's base does not have
GUI_LIBRARY = re.compile(r"^lib(X|xcb|GL|EGL|OpenGL|GLX|glib-|gthread-|gobject-|gio-|gtk|gdk|Qt|SM\.|ICE\.)")
PROBE_DIR = f"{HOST}/probe"
ENTRY_SCRIPTS = ("train.py", "sample.py", "score.py")


def project_modules(files: list[str]) -> list[str]:
    """The project's own modules among the image's files: the entry scripts, libs/, configs/ and tools/."""
    modules = []
    for name in files:
        if name.endswith(".py") and (name in ENTRY_SCRIPTS or name.startswith(("libs/", "configs/", "tools/"))):
            modules.append(name[:-3].replace("/", ".").removesuffix(".__init__"))
    return sorted(modules)


def run_probe(root: Root, *arguments: str) -> object:
    """probe.py inside the root (with /workspace importable, the network cut); its JSON result."""
    binds = (Bind(Path(probe.__file__).parent, PROBE_DIR),)
    command = f"PYTHONPATH={root.workdir} python {PROBE_DIR}/probe.py " + " ".join(arguments)
    done = root.run(command, binds=binds, capture=True, timeout=900)
    results = [line for line in done.stdout.splitlines() if line.startswith(probe.RESULT_PREFIX)]
    if not results:
        raise RuntimeError(f"probe.py {' '.join(arguments)} gave no result (exit {done.returncode}):\n"
                           f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads(results[-1][len(probe.RESULT_PREFIX):])


def import_problems(results: list[dict]) -> list[str]:
    """One line per failed import, naming the missing shared library when that is the cause."""
    problems = []
    for result in results:
        if result["ok"]:
            continue
        library = result.get("missing_library")
        cause = f"missing shared library {library}" if library else result["error"]
        problems.append(f"import {result['module']} fails in the clean root: {cause}")
    return problems


def gui_links(ldd: dict) -> list[str]:
    """The X/OpenGL/GUI libraries the module's binaries link (resolved or not), as 'binary: library'."""
    return [f"{Path(binary).name}: {library}" for binary, libraries in ldd["binaries"].items()
            for library in libraries if GUI_LIBRARY.match(library)]


def check_runtime(root: Root, files: list[str], log) -> list[str]:
    """Import every runtime and project module, and ldd OpenCV's binary; the problems found (empty = fine)."""
    modules = [*RUNTIME_MODULES, *project_modules(files)]
    results = run_probe(root, "imports", *modules)
    log(f"imports: {sum(r['ok'] for r in results)}/{len(results)} modules import in the clean root")
    problems = import_problems(results)
    ldd = run_probe(root, "ldd", "cv2")
    if not ldd["binaries"]:
        problems.append("no cv2 binary found in the clean root (opencv-python-headless is not installed)")
    gui = gui_links(ldd)
    if gui:
        problems.append("cv2 links X/OpenGL libraries (a GUI OpenCV build is installed; only "
                        "opencv-python-headless may be): " + ", ".join(gui))
    else:
        log(f"ldd: cv2 links no X or OpenGL library ({len(next(iter(ldd['binaries'].values()), {}))} libraries)")
    return problems
