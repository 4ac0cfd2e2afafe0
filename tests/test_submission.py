"""The submission as the organizers grade it: the packaging's checks and plan (Docker does not run here), the
model lookup that works without the mounted models/ holding our extra folders and without network, and the
grader dry run end to end on the tiny world."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import libs.submission
from entrypoints import run_entry
from libs.config import REPO_ROOT
from libs.errors import UserError
from libs.download import resolve_pretrained
from libs.layout import SUBJECTS
from libs.submission import SAMPLE_ARGS_ENV
from tools import make_submission
from libs.tiny_submission import synthetic_face, write_grader_config, write_grader_mounts, write_tiny_insightface_pack

NETWORK_BLOCKER = '''import os, socket

def _refuse(*args, **kwargs):
    with open(os.environ["NETWORK_ATTEMPTS"], "a") as log:
        log.write(f"{args!r}\\n")
    raise OSError("network access during an offline run")

socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.create_connection = _refuse
socket.getaddrinfo = _refuse
'''


def project_copy(root: Path, trained: dict[str, Path]) -> Path:
    """The repository's files (not symlinks: the tools find their project from their own location) with a trained
    model_output/ for the four subjects."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\n")
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file() and not name.startswith(("tests/", "bench/", "assets/")):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    for name, folder in trained.items():
        shutil.copytree(folder, root / "model_output" / name)
    return root


def run_tool(root: Path, argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, argv)], cwd=root, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_model_folders_fall_back_to_the_baked_location(tmp_path, monkeypatch):
    baked = tmp_path / "baked" / "clip-vit-large-patch14"
    baked.mkdir(parents=True)
    (baked / "config.json").write_text("{}")
    mounted = tmp_path / "models" / "clip-vit-large-patch14"
    monkeypatch.delenv("UNIDIFFUSER_EXTRA_MODELS", raising=False)
    assert resolve_pretrained(str(mounted), "openai/clip-vit-large-patch14", "CLIP") == "openai/clip-vit-large-patch14"
    with pytest.raises(UserError, match="no config.json in"):
        resolve_pretrained(str(mounted), "", "CLIP")
    monkeypatch.setenv("UNIDIFFUSER_EXTRA_MODELS", str(tmp_path / "baked"))
    assert resolve_pretrained(str(mounted), "openai/clip-vit-large-patch14", "CLIP") == str(baked)
    mounted.mkdir(parents=True)
    (mounted / "config.json").write_text("{}")
    assert resolve_pretrained(str(mounted), "openai/clip-vit-large-patch14", "CLIP") == str(mounted)


def test_offline_without_the_model_names_it(tmp_path, tiny_config_file):
    """Hub off and the CLIP folder nowhere: one clear error naming the model and where it was looked for. A real
    process, as in the graders' container: the hub reads HF_HUB_OFFLINE when it is imported, so setting it in
    this process would not switch it off (the loader would retry the hub for minutes instead)."""
    config = tmp_path / "no_clip.py"
    config.write_text(tiny_config_file.read_text().replace(
        "    return config\n", "    config.paths.clip_text = 'models/absent-clip'\n"
                              "    config.paths.clip_text_hub = 'openai/clip-vit-large-patch14'\n    return config\n"))
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(["a boy"]))
    done = run_tool(tmp_path, [REPO_ROOT / "sample.py", "--config", config, "--base_model", "--prompt_path", prompts,
                               "--output_path", tmp_path / "out", "--steps", "1", "--device", "cpu"],
                    env={"HF_HUB_OFFLINE": "1", "UNIDIFFUSER_EXTRA_MODELS": ""})
    err = done.stderr
    assert done.returncode == 2 and "Traceback" not in err
    assert "CLIP" in err and "openai/clip-vit-large-patch14" in err and "HF_HUB_OFFLINE" in err
    assert not (tmp_path / "out").exists()


def test_make_submission_checks_inputs_and_prints_the_plan(tmp_path, tiny_world, subject_personalizations, monkeypatch,
                                                           capsys):
    """The README's dry run as a real process from the project copy; the other modes in this process with the
    copy as the project (what the tool's own location gives a process)."""
    root = project_copy(tmp_path / "project", subject_personalizations)
    pack = tmp_path / "insightface"
    write_tiny_insightface_pack(pack)
    config = tmp_path / "config.py"
    config.write_text("from libs.config import load_config\n\n\ndef get_config():\n    config = load_config('tiny')\n"
                      f"    config.paths.clip_text = {str(tiny_world / 'clip-vit-large-patch14')!r}\n"
                      f"    config.paths.clip_img = {str(tiny_world / 'clip-vit-base-patch32')!r}\n    return config\n")
    tool = root / "tools" / "make_submission.py"
    done = run_tool(tmp_path, [tool, "--dry-run", "--name", "team", "--config", config, "--insightface_root", pack])
    assert done.returncode == 0, done.stderr
    for name in SUBJECTS:
        assert f"model_output/{name}" in done.stdout
    assert f"docker build -t team:submit {root}" in done.stdout
    assert f"docker save team:submit | gzip > {root / 'team_submit.tar.gz'}" in done.stdout
    for mount in ("eval_prompts_advance", "train_data", "models"):
        assert f'-v "$PWD/{mount}:/workspace/{mount}"' in done.stdout
    assert "--network none" in done.stdout and "/workspace/sample.sh > /workspace/results.log 2>&1" in done.stdout
    assert not (root / "build").exists()  # a dry run copies nothing
    monkeypatch.setattr(libs.submission, "REPO_ROOT", root)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert run_entry(make_submission, ["--dry-run", "--name", "team", "--config", config, "--insightface_root", pack,
                                       "--candidates", "4"]) == 0
    best_of = capsys.readouterr().out
    assert f"docker build -t team:submit --build-arg 'SAMPLE_ARGS=--candidates 4' {root}" in best_of
    assert "sample.py --all --candidates 4 (best-of-4" in best_of
    assert f"ENV {SAMPLE_ARGS_ENV}=" in (REPO_ROOT / "Dockerfile").read_text() and SAMPLE_ARGS_ENV in best_of

    assert run_entry(make_submission, ["--stage-only", "--config", config, "--insightface_root", pack]) == 0
    models = root / "build" / "submission" / "models"
    assert (models / "clip-vit-large-patch14" / "config.json").is_file()
    assert (models / "clip-vit-base-patch32" / "model.safetensors").is_file()
    assert sorted(p.name for p in (models / "insightface" / "models" / "buffalo_l").iterdir()) == \
        sorted(p.name for p in (pack / "models" / "buffalo_l").iterdir())

    shutil.rmtree(root / "model_output" / "girl2")
    (root / "model_output" / "boy2" / "personalization.json").write_text("[]")
    capsys.readouterr()
    nowhere = tmp_path / "nowhere"
    assert run_entry(make_submission, ["--dry-run", "--config", config, "--insightface_root", nowhere]) == 2
    refused = capsys.readouterr().err
    assert "Traceback" not in refused
    assert "model_output/girl2" in refused and "model_output/boy2" in refused and "insightface buffalo_l" in refused


@pytest.mark.slow
@pytest.mark.parametrize("candidates", [1, 2])
def test_grader_dry_run_on_the_tiny_world(tmp_path, tiny_world, subject_personalizations, public_photos, candidates):
    """tools/grade_like_organizer.sh: only the mounts, hub off, every network call refused, then the sum of the
    `finetuned parameters` lines and the score dict. With --candidates 2 the no-argument sample.sh runs best-of-2
    as the image bakes it, ranking with the baked insightface pack (a tiny one) against train_data/<name>/."""
    root = project_copy(tmp_path / "project", subject_personalizations)
    photos = [public_photos["astronaut"], public_photos["grace_hopper"],
              Image.fromarray(synthetic_face("left"))]  # the last: the face the tiny insightface pack finds
    mounts = write_grader_mounts(tiny_world, tmp_path / "mounts", photos)
    models, prompts = mounts / "models", mounts / "eval_prompts_advance"
    extra = tmp_path / "baked"
    extra.mkdir()
    for name in ("clip-vit-large-patch14", "clip-vit-base-patch32"):
        (extra / name).symlink_to(tiny_world / name)
    if candidates > 1:
        write_tiny_insightface_pack(extra / "insightface")
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(NETWORK_BLOCKER)
    attempts = tmp_path / "network_attempts.log"
    config = write_grader_config(tmp_path / "grader_tiny.py")
    done = subprocess.run(
        ["bash", str(root / "tools" / "grade_like_organizer.sh"), "--workdir", str(tmp_path / "grade"),
         "--models", str(models), "--train_data", str(mounts / "train_data"), "--prompts", str(prompts),
         "--extra_models", str(extra), "--sample_args", f"--config {config} --steps 2 --device cpu",
         "--score_args", f"--config {config} --face_backend dlib --device cpu", "--candidates", str(candidates)],
        capture_output=True, text=True, timeout=1800, cwd=tmp_path,
        env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(blocker),
             "NETWORK_ATTEMPTS": str(attempts)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not attempts.exists(), attempts.read_text()
    log = (tmp_path / "grade" / "workspace" / "results.log").read_text()
    lines = [int(v) for v in re.findall(r"^finetuned parameters: (\d+)$", log, re.MULTILINE)]
    assert len(lines) == 8 and log.count(f"best-of-{candidates} (") == (8 if candidates > 1 else 0)
    summary = re.search(r"finetuned parameters: (\d+) \(the sum of 8 ", done.stdout)
    assert summary and int(summary.group(1)) == sum(lines) > 0
    assert re.search(r"\{'sim_face': [0-9.]+, 'sim_clip_img': [0-9.]+, 'edit_face': [0-9.]+, "
                     r"'edit_clip_img': [0-9.]+, 'edit_clip_text': [0-9.]+\}", done.stdout), done.stdout[-2000:]
