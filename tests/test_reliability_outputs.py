"""Every program of the README against every output-path fault (libs/outputs.py, the one shared check): an
output path that is a file, inside a file, on a read-only mount or on a full disk, and an existing folder of
the user's unrelated files. Each is refused with exit 2 and one `error:` line naming the output path, no
traceback, and nothing written, changed or left behind.

The programs and their output flag are one table; the matrix runs them in-process through run_cli (what their
`__main__` line does), and a subset again as real processes, where exit status and stderr are the process's."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pytest

import sample
import score
import train
from bench import bench_uvit
from entrypoints import run_entry
from libs.config import REPO_ROOT
from libs.errors import run_cli
from test_reliability import tmpfs
from tools import class_images, crop, demo, download, make_submission, tiny_world


@dataclass(frozen=True)
class Program:
    """One command of the README: how to run it in-process, its command line with `out` as its output path."""

    name: str
    script: str  # the file a user runs (`-m module` as the README runs the benches: from the repository)
    argv: Callable[[dict[str, Path], Path], list]  # (inputs, output path) -> arguments
    run: Callable[[list[str]], int]

    def command(self, inputs: dict[str, Path], out: Path) -> list[str]:
        script = self.script.split() if self.script.startswith("-m ") else [str(REPO_ROOT / self.script)]
        return [sys.executable, *script, *map(str, self.argv(inputs, out))]


def _entry(module) -> Callable[[list[str]], int]:
    return lambda argv: run_entry(module, argv)


def _download_argv(inputs: dict[str, Path], out: Path) -> list:
    """tools/download.py writes where the config's paths say: a config whose U-ViT file goes into `out`."""
    config = inputs["root"] / "download_config.py"
    config.write_text(inputs["config"].read_text().replace(
        "    return config\n", f"    config.paths.nnet = {str(out / 'uvit_v1.pth')!r}\n    return config\n"))
    return ["--config", config, "--only", "nnet"]


def _bench(argv: list[str]) -> int:
    try:
        run_cli(lambda: bench_uvit.main([str(a) for a in argv]))
    except SystemExit as exit_info:
        return exit_info.code if isinstance(exit_info.code, int) else 1
    return 0


PROGRAMS = [
    Program("train.py", "train.py", lambda i, out: [
        "--config", i["config"], "-d", i["photos"], "-o", out, "--no_prior_preservation", "--train_step", "1"],
        _entry(train)),
    Program("sample.py", "sample.py", lambda i, out: [
        "--config", i["config"], "--restore_path", i["restore"], "--prompt_path", i["prompts"], "--output_path", out,
        "--steps", "1", "--device", "cpu"], _entry(sample)),
    Program("score.py", "score.py", lambda i, out: [
        "--config", i["config"], "--dataset", i["photos"].parent, "--prompts", i["prompts"].parent, "--outputs", out,
        "--tasks", "boy1", "--face_backend", "dlib"], _entry(score)),
    Program("crop.py", "tools/crop.py", lambda i, out: [
        "-i", i["photos"].parent, "-o", out, "--no_rembg", "--face_backend", "dlib"], _entry(crop)),
    Program("class_images.py celeba", "tools/class_images.py", lambda i, out: [
        "celeba", "--celeba_dir", i["root"] / "celeba", "-o", out, "-n", "2"], _entry(class_images)),
    Program("class_images.py generate", "tools/class_images.py", lambda i, out: [
        "generate", "--config", i["config"], "-o", out, "-n", "1", "--steps", "1", "--device", "cpu"],
        _entry(class_images)),
    Program("tiny_world.py", "tools/tiny_world.py", lambda i, out: ["--out", out], _entry(tiny_world)),
    Program("download.py", "tools/download.py", _download_argv, _entry(download)),
    Program("demo.py", "tools/demo.py", lambda i, out: ["--workdir", out, "--train_step", "1"], _entry(demo)),
    Program("bench_uvit", "-m bench.bench_uvit", lambda i, out: [
        "--results-dir", out, "--repeats", "1", "--warmup", "0", "--passes", "fwd", "--dtypes", "fp32",
        "--attention", "sdpa", "--checkpointing", "off"], _bench),
]
BY_NAME = {program.name: program for program in PROGRAMS}
FAULTS = ("file", "inside_a_file", "read_only", "full_disk", "foreign_folder")


@pytest.fixture()
def inputs(tmp_path, tiny_config_file, photos, personalization) -> dict[str, Path]:
    """Valid inputs for every program, outside the area the output faults are made in (the personalization is
    the session's, read-only)."""
    prompts = tmp_path / "eval_prompts" / "boy1.json"
    prompts.parent.mkdir()
    prompts.write_text(json.dumps(["a boy smiling"]))
    return {"root": tmp_path, "config": tiny_config_file, "photos": photos, "prompts": prompts,
            "restore": personalization}


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for folders): what must stay exactly as it was."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def make_fault(fault: str, area: Path, stack: ExitStack) -> tuple[Path, Path]:
    """(the output path to give, the path the error must name) for one fault, made inside `area`."""
    area.mkdir()
    if fault == "file":
        out = area / "taken.txt"
        out.write_text("the user's file")
        return out, out
    if fault == "inside_a_file":
        (area / "taken.txt").write_text("the user's file")
        return area / "taken.txt" / "out", area / "taken.txt"
    if fault == "read_only":
        read_only = stack.enter_context(tmpfs(area / "ro", "ro,size=1m"))
        return read_only / "out", read_only / "out"
    if fault == "full_disk":
        full = stack.enter_context(tmpfs(area / "full", "size=64k"))
        with open(full / "user_data.bin", "wb") as handle:  # the user's file fills the disk to the last block
            try:
                handle.write(b"\0" * (1 << 20))
            except OSError:
                pass
        assert os.statvfs(full).f_bavail == 0
        return full / "out", full / "out"
    theirs = area / "my_folder"  # foreign_folder
    (theirs / "notes").mkdir(parents=True)
    (theirs / "holiday.jpg").write_bytes(b"\xff\xd8 not ours")
    (theirs / "notes" / "todo.md").write_text("keep")
    (theirs / "grid.jpg").write_bytes(b"a name a program writes")  # one of ours among the user's files
    return theirs, theirs


def assert_refused(code: int, err: str, named: Path) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(re.findall(r"^error: ", err, re.M)) == 1, err
    assert str(named) in err, err


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("name", list(BY_NAME))
def test_every_program_refuses_a_bad_output_path(name, fault, inputs, tmp_path, monkeypatch, capsys):
    program = BY_NAME[name]
    if name == "download.py" and fault == "foreign_folder":
        pytest.skip("download.py only adds the missing weight files of the config's names into models/ (which holds "
                    "other models too) and replaces nothing; this case would go to the hub")
    monkeypatch.chdir(tmp_path)
    with ExitStack() as stack:
        out, named = make_fault(fault, tmp_path / "area", stack)
        before = snapshot(tmp_path / "area")
        capsys.readouterr()
        code = program.run(program.argv(inputs, out))
        err = capsys.readouterr().err
        if name == "score.py" and fault == "foreign_folder":  # score.py only adds its reports beside the images
            assert_refused(code, err, named)  # ... and finds no images to score there
        else:
            assert_refused(code, err, named)
        assert snapshot(tmp_path / "area") == before


# the first pass's three tracebacks, and one case of each fault, as real processes
PROCESS_CASES = [("crop.py", "file"), ("class_images.py generate", "file"), ("score.py", "read_only"),
                 ("tiny_world.py", "foreign_folder"), ("bench_uvit", "full_disk"), ("train.py", "inside_a_file")]


@pytest.mark.slow
@pytest.mark.parametrize("name, fault", PROCESS_CASES)
def test_real_processes_exit_2_with_one_error_line(name, fault, inputs, tmp_path):
    program = BY_NAME[name]
    with ExitStack() as stack:
        out, named = make_fault(fault, tmp_path / "area", stack)
        before = snapshot(tmp_path / "area")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
        done = subprocess.run(program.command(inputs, out), capture_output=True, text=True, cwd=tmp_path, env=env,
                              timeout=300)
        assert_refused(done.returncode, done.stderr, named)
        assert snapshot(tmp_path / "area") == before


def test_score_with_an_output_folder_it_cannot_write(inputs, tmp_path, capsys):
    """The first pass's PermissionError: score.py's rendered images on a folder it may read but not write."""
    with tmpfs(tmp_path / "mount", "size=1m") as mount:
        outputs = mount / "outputs"
        (outputs / "boy1").mkdir(parents=True)
        (outputs / "boy1" / "0-000.jpg").write_bytes((inputs["photos"] / "astronaut.jpg").read_bytes())
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        before = snapshot(mount)
        code = run_entry(score, BY_NAME["score.py"].argv(inputs, outputs))
        err = capsys.readouterr().err
        assert_refused(code, err, outputs)
        assert "read-only file system" in err and snapshot(mount) == before


def test_own_output_folders_are_still_accepted(inputs, tmp_path, capsys):
    """The refusal is about other people's files: a program's own earlier output is resumed as before."""
    out = tmp_path / "crops"
    argv = BY_NAME["crop.py"].argv(inputs, out)
    assert run_entry(crop, argv) == 0
    assert run_entry(crop, argv) == 0  # its own crops.json: an up-to-date rerun
    assert "0 new" in capsys.readouterr().out

    images = tmp_path / "images"
    sample_argv = BY_NAME["sample.py"].argv(inputs, images)
    assert run_entry(sample, sample_argv) == 0
    assert run_entry(sample, [*sample_argv, "--skip_existing"]) == 0


def test_make_submission_with_an_unwritable_build_folder(tmp_path, monkeypatch, capsys):
    """The staging folder and the archive's folder are checked with the other inputs (--dry-run too)."""
    import libs.submission

    root = tmp_path / "project"
    root.mkdir()
    (root / "build").write_text("a file where build/ goes")
    monkeypatch.setattr(libs.submission, "REPO_ROOT", root)
    code = run_entry(make_submission, ["--dry-run", "--insightface_root", tmp_path / "none"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert re.search(rf"build folder {re.escape(str(root / 'build'))}.* cannot be created: .*build is a file", err), err
    assert (root / "build").read_text() == "a file where build/ goes"


def grade(argv: Sequence[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO_ROOT / "tools" / "grade_like_organizer.sh"), *map(str, argv)],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.fixture()
def mounts(tmp_path) -> list:
    """What grade_like_organizer.sh needs mounted (the files' contents do not matter before sampling)."""
    models = tmp_path / "models"
    models.mkdir()
    for name in ("uvit_v1.pth", "autoencoder_kl.pth", "caption_decoder.pth"):
        (models / name).write_bytes(b"weights")
    for name in ("train_data", "eval_prompts_advance", "extra_models"):
        (tmp_path / name).mkdir()
    return ["--models", models, "--train_data", tmp_path / "train_data", "--prompts",
            tmp_path / "eval_prompts_advance", "--extra_models", tmp_path / "extra_models"]


@pytest.mark.parametrize("fault", ["file", "inside_a_file", "read_only", "full_disk", "foreign_folder"])
def test_grade_like_organizer_refuses_a_bad_workdir(fault, mounts, tmp_path):
    with ExitStack() as stack:
        out, named = make_fault(fault, tmp_path / "area", stack)
        before = snapshot(tmp_path / "area")
        done = grade(["--workdir", out, *mounts], tmp_path)
        assert_refused(done.returncode, done.stderr, named)
        assert snapshot(tmp_path / "area") == before


@pytest.mark.parametrize("missing", ["--models", "--train_data", "--prompts", "uvit_v1.pth"])
def test_grade_like_organizer_names_a_missing_mount(missing, mounts, tmp_path):
    if missing == "uvit_v1.pth":
        (tmp_path / "models" / "uvit_v1.pth").unlink()
        named = tmp_path / "models" / "uvit_v1.pth"
    else:
        named = tmp_path / "absent"
        mounts[mounts.index(missing) + 1] = named
    done = grade([*mounts, "--workdir", tmp_path / "grade"], tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert str(named) in done.stderr, done.stderr
    assert not (tmp_path / "grade").exists()
