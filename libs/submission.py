"""Packaging a submission the way the organizers grade it (spec §3): a Docker image holding the code, the
trained `model_output/` of the four subjects and every model they do not mount (CLIP ViT-L/14 text encoder and
tokenizer, CLIP ViT-B/32, insightface buffalo_l), saved as `<name>_submit.tar.gz`.

Everything is checked before anything is copied or built; the models are staged from the user's local copies
into build/submission/models (no download at build time), where the Dockerfile picks them up.
"""
from __future__ import annotations

import gzip
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import ml_collections

from libs.config import REPO_ROOT
from libs.download import local_model_folder
from libs.errors import UserError
from libs.face import INSIGHTFACE_MODEL, insightface_model_dir, insightface_models_present
from libs.outputs import OutputPathError, check_output_folder
from libs.personalization import check_restore_path
from libs.layout import ADVANCED, MODEL_OUTPUT, PROMPT_ROOTS, SUBJECTS, TRAIN_DATA, model_dir

STAGE_DIR = Path("build") / "submission" / "models"
GRADER_MOUNTS = (PROMPT_ROOTS[ADVANCED], TRAIN_DATA, "models")
SAMPLE_ARGS_ENV = "UNIDIFFUSER_SAMPLE_ARGS"
"""sample.sh puts this variable's words before its own arguments: the image bakes the chosen sampling settings
(e.g. best-of-N's `--candidates 4`) there, so the organizers' no-argument `./sample.sh` runs with them."""


def grader_command(sample_args: str = "", score_args: str = "") -> str:
    """The organizers' commands inside the image (no arguments); the tiny-world checks add theirs."""
    return (f"/workspace/sample.sh{' ' + sample_args if sample_args else ''} > /workspace/results.log 2>&1; "
            "grep 'finetuned parameters' /workspace/results.log | awk '{s+=$(NF)} END {print s}'; "
            f"python score.py{' ' + score_args if score_args else ''}")


GRADER_COMMAND = grader_command()


@dataclass
class SubmissionPlan:
    """What will be packaged, from where, and the commands that do it."""

    root: Path
    name: str
    tag: str
    subjects: dict[str, Path]
    models: list[tuple[Path, Path]] = field(default_factory=list)  # (local source, staged target)
    candidates: int = 1  # best-of-N in the image's sample.sh (1 = off)

    @property
    def sample_args(self) -> str:
        """What the image's sample.sh adds to `sample.py --all` (the SAMPLE_ARGS build argument)."""
        return f"--candidates {self.candidates}" if self.candidates > 1 else ""

    @property
    def archive(self) -> Path:
        return self.root / f"{self.name}_submit.tar.gz"

    def build_command(self) -> list[str]:
        extra = ["--build-arg", f"SAMPLE_ARGS={self.sample_args}"] if self.sample_args else []
        return ["docker", "build", "-t", self.tag, *extra, str(self.root)]

    def run_line(self) -> str:
        """The organizers' grading, tried locally: their mounts, no network, no arguments."""
        mounts = " ".join(f'-v "$PWD/{name}:/workspace/{name}"' for name in GRADER_MOUNTS)
        return (f"docker load -i {shlex.quote(str(self.archive))} && docker run --gpus all --rm --network none "
                f"{mounts} {self.tag} bash -c {shlex.quote(GRADER_COMMAND)}")

    def describe(self) -> str:
        lines = [f"submission {self.name!r} (image {self.tag}):"]
        lines += [f"  {MODEL_OUTPUT}/{name}: {path}" for name, path in self.subjects.items()]
        lines += [f"  {target.relative_to(self.root)} <- {source} "
                  f"({sum(p.stat().st_size for p in model_files(source)) / 2**20:.0f} MiB)" for source, target in self.models]
        lines.append(f"  sample.sh in the image ({SAMPLE_ARGS_ENV}={self.sample_args!r}): sample.py --all "
                     f"{self.sample_args}".rstrip()
                     + (f" (best-of-{self.candidates}: about {self.candidates}x the denoising and decoding time, plus "
                        "scoring every candidate with insightface buffalo_l and CLIP ViT-B/32)" if self.sample_args
                        else ""))
        lines += [f"  build: {' '.join(map(shlex.quote, self.build_command()))}",
                  f"  save:  docker save {self.tag} | gzip > {self.archive}",
                  f"  try it: {self.run_line()}"]
        return "\n".join(lines)


def _local_model_folder(local: str, what: str, problems: list[str]) -> Path | None:
    folder = local_model_folder(local)
    if folder is None:
        problems.append(f"{what}: no local copy at {Path(local)} (the image cannot download it): "
                        "run `python tools/download.py` first")
    return folder


def plan_submission(config: ml_collections.ConfigDict, name: str, insightface_root: str | Path,
                    root: Path | None = None, tag: str | None = None, candidates: int = 1) -> SubmissionPlan:
    """Check every input (the four trained subjects, the local model copies, the build and archive folders);
    one error lists all problems. `root`: the project (default: this repository). `candidates` > 1 bakes
    best-of-N into the image's sample.sh (it ranks with the baked insightface pack)."""
    root = REPO_ROOT if root is None else root
    problems: list[str] = []
    if candidates < 1:
        problems.append(f"--candidates must be >= 1, got {candidates}")
    subjects = {}
    for subject in SUBJECTS:
        folder = model_dir(subject, root)
        try:
            check_restore_path(folder)
            subjects[subject] = folder
        except UserError as error:
            problems.append(f"{MODEL_OUTPUT}/{subject}: {error}")
    stage = root / STAGE_DIR
    models = []
    for key, what in (("clip_text", "CLIP ViT-L/14 text encoder"), ("clip_img", "CLIP ViT-B/32 (image encoder, scorer)")):
        folder = _local_model_folder(config.paths[key], what, problems)
        if folder is not None:
            models.append((folder, stage / folder.name))
    pack = insightface_model_dir(insightface_root)
    if not insightface_models_present(insightface_root):
        problems.append(f"insightface {INSIGHTFACE_MODEL}: no *.onnx in {pack} (pass --insightface_root, or let "
                        "insightface fetch it once: see `python score.py --help`)")
    else:
        models.append((pack, stage / "insightface" / "models" / INSIGHTFACE_MODEL))
    for folder, what in ((stage, "build folder"), (root, "archive folder")):
        try:
            check_output_folder(folder, what)
        except OutputPathError as error:
            problems.append(str(error))
    if problems:
        raise UserError("the submission is not ready:\n  " + "\n  ".join(problems))
    return SubmissionPlan(root, name, tag or f"{name.lower()}:submit", subjects, models, candidates)


def model_files(folder: Path) -> list[Path]:
    """The files of a model folder that loading needs: no TensorFlow/Flax copies, no .bin beside safetensors."""
    files = [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
             and p.suffix not in (".h5", ".msgpack", ".ot") and not p.name.startswith(("tf_model", "flax_model"))]
    if any(p.suffix == ".safetensors" for p in files):
        files = [p for p in files if p.suffix != ".bin"]
    return sorted(files)


def stage_models(plan: SubmissionPlan) -> None:
    """Copy the models into build/submission/models (hard links where possible); up-to-date files are kept."""
    for source, target in plan.models:
        for file in model_files(source):
            destination = target / file.relative_to(source)
            if destination.is_file() and destination.stat().st_size == file.stat().st_size:
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            tmp = destination.with_name(f".{destination.name}.tmp")
            tmp.unlink(missing_ok=True)
            try:
                os.link(file, tmp)
            except OSError:
                shutil.copy2(file, tmp)
            os.replace(tmp, destination)


def build_and_save(plan: SubmissionPlan) -> Path:
    """`docker build`, then `docker save | gzip` into the archive (written atomically)."""
    if shutil.which("docker") is None:
        raise UserError("docker is not installed here: build on a machine with Docker, or check the inputs "
                        "with --dry-run")
    if subprocess.run(plan.build_command()).returncode != 0:
        raise UserError(f"docker build of {plan.tag} failed (see its output above)")
    tmp = plan.archive.with_name(f".{plan.archive.name}.tmp")
    with subprocess.Popen(["docker", "save", plan.tag], stdout=subprocess.PIPE) as saver, gzip.open(tmp, "wb") as out:
        shutil.copyfileobj(saver.stdout, out, 1 << 24)
    if saver.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise UserError(f"docker save {plan.tag} failed")
    os.replace(tmp, plan.archive)
    return plan.archive
