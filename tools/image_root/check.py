"""The whole image check: the clean root (cached dependency layer), the rest of the Dockerfile replayed on an
overlay with the tiny submission as its build context, then the runtime imports, OpenCV's links and the
organizers' flow checked inside it."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from libs.errors import UserError
from libs.locks import FolderLock
from tools.image_root.checks import RUNTIME_MODULES, check_runtime
from tools.image_root.dockerfile import INERT, context_files, parse_dockerfile
from tools.image_root.flow import FlowResult, run_grader_flow, tiny_submission
from tools.image_root.root import Overlay, Root, build_layer, dependency_steps, host_problems


class ImageCheckFailed(UserError):
    """The submission image would fail at grading: each problem names what is missing."""


@dataclass
class ReplayedImage:
    root: Root  # the image's files on an overlay of the cached layer, with the image's ENV and WORKDIR
    files: list[str]  # the build context's files (what COPY . . copied)
    mounts: Path  # the organizers' mounts on the tiny world
    work: Path

    def fork(self, workdir: Path) -> Root:
        """Another writable layer on top of this image (which it leaves as it is), e.g. to break it on purpose."""
        shutil.rmtree(workdir, ignore_errors=True)
        overlay = Overlay((self.root.overlay.upper, *self.root.overlay.lowers), workdir)
        return Root(self.root.path, overlay, env=dict(self.root.env), workdir=self.root.workdir,
                    args=dict(self.root.args))


def replay_image(project: Path, work: Path, cache: Path, torch_spec: str,
                 log: Callable[[str], None] = print) -> ReplayedImage:
    """The Dockerfile replayed in a clean root: the dependency layer from the cache (built when absent), then the
    remaining steps on a fresh overlay under `work`."""
    problems = host_problems()
    if problems:
        raise UserError("the image check cannot run here: " + "; ".join(problems))
    work.mkdir(parents=True, exist_ok=True)
    context, mounts = tiny_submission(project, work, log)
    files = context_files(context)
    instructions = parse_dockerfile(context / "Dockerfile")
    layer = build_layer(instructions, context, files, torch_spec, cache, log, warm=RUNTIME_MODULES)
    overlay_dir = work / "overlay"
    shutil.rmtree(overlay_dir, ignore_errors=True)
    root = Root(layer.path, Overlay((layer.path,), overlay_dir), env=dict(layer.env), workdir=layer.workdir,
                args=dict(layer.args))
    for instruction in instructions[dependency_steps(instructions):]:
        if instruction.keyword not in INERT:
            log(f"image: Dockerfile line {instruction.line}: {instruction}")
        root.replay(instruction, context, files)
    return ReplayedImage(root, files, mounts, work)


def check_image(project: Path, work: Path, cache: Path, torch_spec: str,
                log: Callable[[str], None] = print) -> FlowResult:
    """Every check; raises ImageCheckFailed listing all problems, else returns the organizers' flow result.
    The cache is held for the whole check: another check would build into it or delete the root in use."""
    cache.mkdir(parents=True, exist_ok=True)
    with FolderLock(cache, "tools/image_check.py"):
        image = replay_image(project, work, cache, torch_spec, log)
        problems = check_runtime(image.root, image.files, log)
        log("flow: the organizers' commands in /workspace, offline, with only their mounts")
        flow = run_grader_flow(image.root, image.mounts, work)
    problems += flow.problems()
    if problems:
        raise ImageCheckFailed("the submission image would fail in its bare base:\n  " + "\n  ".join(problems))
    return flow
