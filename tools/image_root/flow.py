"""The submission image's contents and the organizers' grading, on the tiny world: a build context as
`docker build` would get it (the project's files through .dockerignore, a trained model_output/ and the models
staged by libs/submission.py as the real build stages them), the organizers' mounts, and their commands run
inside the clean root with the network cut and every attempted connection recorded."""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image

from libs.submission import grader_command, plan_submission, stage_models
from libs.tiny_submission import (synthetic_face, tiny_world_config, write_grader_config, write_grader_mounts,
                                  write_subjects, write_tiny_insightface_pack)
from libs.tiny_world import build_tiny_world
from tools.image_root.dockerfile import context_files
from tools.image_root.root import HOST, Bind, Root

FLOW_DIR = f"{HOST}/flow"
NETWORK_LOG = f"{HOST}/log/network.log"
SAMPLE_STEPS = 2  # DPM-Solver steps on the tiny world: the flow, not the images, is under test
# records every attempted network access (connect to an address, name lookup) of every Python process
NETWORK_AUDIT = '''import os, sys

def _audit(event, args):
    if event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr") and (
            event != "socket.connect" or isinstance(args[1], tuple)):
        with open(os.environ["IMAGE_CHECK_NETWORK_LOG"], "a") as log:
            log.write(f"{os.getpid()} {sys.argv[0]}: {event} {args[1:]!r}\\n")

sys.addaudithook(_audit)
'''
# what the organizers' command line must print: the parameter sum, then score.py's dict of the advanced split
SCORE_DICT = re.compile(r"\{'sim_face': [0-9.e-]+, 'sim_clip_img': [0-9.e-]+, 'edit_face': [0-9.e-]+, "
                        r"'edit_clip_img': [0-9.e-]+, 'edit_clip_text': [0-9.e-]+\}")
PARAMETER_LINE = re.compile(r"^finetuned parameters: (\d+)$", re.MULTILINE)


def tiny_submission(project: Path, work: Path, log: Callable[[str], None]) -> tuple[Path, Path]:
    """(build context, organizers' mounts) under `work`: the project's files without its own model_output/ and
    build/, the tiny world's trained subjects, and the CLIP folders and a stand-in buffalo_l pack staged by
    libs/submission.py into build/submission/models (the real build's path)."""
    world = build_tiny_world("tiny", work / "tiny_world" / "models")
    context = work / "context"
    shutil.rmtree(context, ignore_errors=True)
    for name in context_files(project):
        if name.startswith(("model_output/", "build/")):
            continue
        source, target = project / name, context / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, target)
    config = tiny_world_config(world)
    write_subjects(config, context / "model_output")
    pack = work / "insightface"
    shutil.rmtree(pack, ignore_errors=True)
    write_tiny_insightface_pack(pack)
    plan = plan_submission(config, "image_check", pack, root=context)
    stage_models(plan)
    log(f"context: {context} (tiny model_output/ of 4 subjects; {len(plan.models)} staged model folders)")
    mounts = work / "mounts"
    shutil.rmtree(mounts, ignore_errors=True)
    photos = [Image.fromarray(synthetic_face("left")), Image.open(project / "assets" / "demo" / "astronaut.jpg")]
    write_grader_mounts(world, mounts, photos)
    return context, mounts


@dataclass
class FlowResult:
    output: str  # what the organizers' command line printed
    results_log: str  # /workspace/results.log
    network: str  # attempted network accesses, one per line

    @property
    def parameter_lines(self) -> list[int]:
        return [int(value) for value in PARAMETER_LINE.findall(self.results_log)]

    @property
    def printed_sum(self) -> int | None:
        """The grep | awk line's output: the first line of the command's output that is a bare integer."""
        found = re.search(r"^(\d+)$", self.output, re.MULTILINE)
        return int(found.group(1)) if found else None

    @property
    def score_dict(self) -> str | None:
        found = SCORE_DICT.findall(self.output)
        return found[-1] if found else None

    def problems(self) -> list[str]:
        """What the organizers would have seen go wrong (empty = graded)."""
        problems = []
        if self.network:
            problems.append(f"network access attempted during the offline flow:\n{self.network}")
        lines = self.parameter_lines
        if len(lines) != 8:
            problems.append(f"results.log holds {len(lines)} 'finetuned parameters' lines, not 8 (sample.sh's log "
                            f"ends:\n{self.results_log[-3000:]})")
        if self.printed_sum is None or self.printed_sum != sum(lines):
            problems.append(f"the grep | awk sum printed {self.printed_sum}, the lines add up to {sum(lines)}")
        if self.score_dict is None:
            problems.append(f"score.py printed no score dict; its output ends:\n{self.output[-3000:]}")
        return problems


def run_grader_flow(root: Root, mounts: Path, work: Path) -> FlowResult:
    """The organizers' commands in /workspace with only their mounts (read-only), the network cut and every
    connection attempt logged; the tiny world needs the tiny config (`--config`) and few sampling steps."""
    flow = work / "flow"
    shutil.rmtree(flow, ignore_errors=True)
    flow.mkdir(parents=True)
    (flow / "sitecustomize.py").write_text(NETWORK_AUDIT)
    write_grader_config(flow / "grader_tiny.py")
    (work / "log").mkdir(exist_ok=True)
    network_log = work / "log" / "network.log"
    network_log.unlink(missing_ok=True)
    binds = tuple(Bind(mounts / name, f"{root.workdir}/{name}") for name in ("models", "train_data", "eval_prompts_advance"))
    binds += (Bind(flow, FLOW_DIR), Bind(work / "log", os.path.dirname(NETWORK_LOG), read_only=False))
    config = f"--config {FLOW_DIR}/grader_tiny.py"
    command = grader_command(sample_args=f"{config} --steps {SAMPLE_STEPS}", score_args=config)
    done = root.run(command, binds=binds, capture=True, timeout=1800,
                    env={"PYTHONPATH": FLOW_DIR, "IMAGE_CHECK_NETWORK_LOG": NETWORK_LOG})
    results = root.overlay.upper / root.workdir.strip("/") / "results.log"
    return FlowResult(output=done.stdout + done.stderr, results_log=results.read_text() if results.is_file() else "",
                      network=network_log.read_text() if network_log.is_file() else "")
