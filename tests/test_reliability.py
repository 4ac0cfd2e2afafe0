"""Bad input and faults through the real entry scripts on the tiny world: every user error exits 2 with
`error: <what>, <which file>, <how to fix>` and no traceback, the offending path or value is named, and the
file system is left as documented (no debris, nothing lost or silently overwritten)."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from PIL import Image

import sample
import train
from entrypoints import run_entry
from libs.files import cached_sha256, hash_cache_dir
from libs.config import REPO_ROOT
from libs.photos import image_is_complete
from libs.prompts import image_name
from libs.train_output import CHECKPOINT_DIR, META_FILE, list_checkpoints
from conftest import copy_folder, wait_until, write_config_file, write_photos

PROMPTS = ["a boy smiling", "a boy on the beach", "a boy in the snow"]
SAMPLE_FAST = ["--steps", "1", "--device", "cpu"]


class Evil:
    """A pickle that would run a command when unpickled without weights_only."""

    def __reduce__(self):
        return os.system, ("touch /tmp/unidiffuser_pwned",)


@pytest.fixture()
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(PROMPTS))
    return path


@pytest.fixture()
def restore(personalization, tmp_path) -> Path:
    """This test's copy of the session's rank-2 personalization, under model_output/boy1."""
    return copy_folder(personalization, tmp_path / "model_output" / "boy1")


def train_args(config_file: Path, photos: Path, out: Path, *extra: str) -> list:
    return ["--config", config_file, "-d", photos, "-o", out, "--no_prior_preservation", "--train_step", "2",
            "--checkpointing_steps", "1", "--keep_checkpoints", *extra]


def sample_args(config_file: Path, restore: Path, prompts: Path, out: Path, *extra: str) -> list:
    return ["--config", config_file, "--restore_path", restore, "--prompt_path", prompts, "--output_path", out,
            *SAMPLE_FAST, *extra]


def refused(capsys, code: int, *patterns: str) -> str:
    """Exit 2, no traceback, every pattern in the message; returns stderr."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    assert re.search(r"^(error: |\S+: error: )", err.replace("\r", "\n"), re.M), err  # one message line, argparse's too
    for pattern in patterns:
        assert re.search(pattern, err, re.S), (pattern, err)
    return err


def grow(path: Path, size: str) -> None:
    """Free space on a test tmpfs (as a user would), so a resumed run can finish."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


@contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A small file system of our own (a full disk, a read-only folder); skipped where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'mount failed'}): needs root in a sandbox")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# --- output folders ---------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["sample", "train"])
def test_output_below_a_file(script, tmp_path, tiny_config_file, photos, restore, prompts, capsys):
    blocker = tmp_path / "taken.txt"
    blocker.write_text("keep me")
    out = blocker / "out"
    if script == "sample":
        code = run_entry(sample, sample_args(tiny_config_file, restore, prompts, out))
    else:
        code = run_entry(train, train_args(tiny_config_file, photos, out))
    refused(capsys, code, re.escape(str(blocker)), "is a file")
    assert blocker.read_text() == "keep me"


@pytest.mark.parametrize("script", ["sample", "train"])
def test_read_only_output(script, tmp_path, tiny_config_file, photos, restore, prompts, capsys):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as read_only:
        out = read_only / "out"
        if script == "sample":
            code = run_entry(sample, sample_args(tiny_config_file, restore, prompts, out))
        else:
            code = run_entry(train, train_args(tiny_config_file, photos, out))
        refused(capsys, code, re.escape(str(out)), "Read-only file system|not writable")
        assert not out.exists()


def test_a_failed_run_leaves_no_new_folder(tmp_path, tiny_config_file, photos, capsys):
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "new" / "deeper" / "out"
    refused(capsys, run_entry(train, train_args(tiny_config_file, photos, out)), r"cannot read image .*broken\.jpg")
    assert not (tmp_path / "new").exists()


def test_cache_dir_that_is_a_file(tmp_path, tiny_config_file, photos, capsys):
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    code = run_entry(train, train_args(tiny_config_file, photos, tmp_path / "out", "--cache_dir", cache))
    refused(capsys, code, re.escape(str(cache)), "is a file")
    assert not (tmp_path / "out").exists()


# --- what sample.py reads -------------------------------------------------------------------------------


@pytest.mark.parametrize("damage, pattern", [
    ("json_list", r"personalization\.json is damaged.*JSON list"),
    ("missing_key", r"personalization\.json is damaged.*uvit_lora must hold r"),
    ("not_json", r"cannot read .*personalization\.json"),
    ("file_missing", r"is incomplete: personalization\.json lists uvit_lora\.safetensors"),
])
def test_damaged_personalization(damage, pattern, tmp_path, tiny_config_file, restore, prompts, capsys):
    meta = json.loads((restore / META_FILE).read_text())
    if damage == "json_list":
        (restore / META_FILE).write_text("[]")
    elif damage == "missing_key":
        del meta["uvit_lora"]["r"]
        (restore / META_FILE).write_text(json.dumps(meta))
    elif damage == "not_json":
        (restore / META_FILE).write_text('{"format": ')
    else:
        (restore / "uvit_lora.safetensors").unlink()
    out = tmp_path / "out"
    refused(capsys, run_entry(sample, sample_args(tiny_config_file, restore, prompts, out)), pattern)
    assert not out.exists()


@pytest.mark.parametrize("holds, pattern", [
    ("nothing", r"holds nothing \(an empty folder\).*--base_model"),
    ("unfinished", r"unfinished training run at step 1 .*--resume latest"),
])
def test_restore_folder_without_a_personalization(holds, pattern, tmp_path, tiny_config_file, photos, prompts, capsys):
    folder = tmp_path / "model_output" / "boy1"
    if holds == "nothing":
        folder.mkdir(parents=True)
    else:  # a run interrupted after its first checkpoint: checkpoints, no personalization.json
        def stop(step, logs):
            raise KeyboardInterrupt

        from libs.config import load_config
        from libs.train import train as train_fn

        config = load_config(tiny_config_file)
        config.train.update(with_prior_preservation=False, train_step=3, checkpointing_steps=1)
        with pytest.raises(KeyboardInterrupt):
            train_fn(config, photos, folder, on_step=stop)
        assert list_checkpoints(folder) and not (folder / META_FILE).exists()
    out = tmp_path / "out"
    refused(capsys, run_entry(sample, sample_args(tiny_config_file, folder, prompts, out)), re.escape(str(folder)),
            pattern)
    assert "finetuned parameters" not in capsys.readouterr().out
    assert not out.exists()


def test_truncated_image_is_remade_by_skip_existing(tmp_path, tiny_config_file, restore, prompts, capsys):
    out = tmp_path / "out"
    assert run_entry(sample, sample_args(tiny_config_file, restore, prompts, out, "--n_samples", "2")) == 0
    victim = out / image_name(1, 1)
    intact = victim.read_bytes()
    victim.write_bytes(intact[: len(intact) // 2])
    assert not image_is_complete(victim)
    capsys.readouterr()
    assert run_entry(sample, sample_args(tiny_config_file, restore, prompts, out, "--n_samples", "2",
                                         "--skip_existing")) == 0
    printed = capsys.readouterr().out
    assert f"remaking 1 existing image(s) that do not decode or have the wrong size: {victim.name}" in printed
    assert image_is_complete(victim) and victim.read_bytes() == intact  # the same keyed noise, the same image
    assert sorted(p.name for p in out.iterdir()) == sorted([image_name(p, i) for p in range(3) for i in range(2)]
                                                          + ["grid.jpg"])


@pytest.mark.parametrize("flag, value, script", [
    ("--scale", "nan", "sample"), ("--scale", "inf", "sample"), ("--steps", "0", "sample"),
    ("--lr", "-1", "train"), ("--lr", "nan", "train"), ("--rank", "0", "train"),
    ("--lora_targets", "qkv no_such_layer", "train"),
])
def test_values_that_cannot_be_meant(flag, value, script, tmp_path, tiny_config_file, photos, restore, prompts,
                                     capsys):
    out = tmp_path / "out"
    if script == "sample":
        code = run_entry(sample, sample_args(tiny_config_file, restore, prompts, out, flag, *value.split()))
    else:
        code = run_entry(train, train_args(tiny_config_file, photos, out, flag, *value.split()))
    refused(capsys, code, re.escape(flag), re.escape(value.split()[-1]))
    assert not out.exists()


def test_cuda_on_a_machine_without_it(tmp_path, tiny_config_file, restore, prompts, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "out"
    code = run_entry(sample, [*sample_args(tiny_config_file, restore, prompts, out), "--device", "cuda"])
    refused(capsys, code, "--device cuda", "no usable CUDA")
    assert not out.exists()


def test_refused_pickles(tmp_path, tiny_config, tiny_config_file, prompts, capsys):
    """The reference entry's token pickle and a CLIP folder's .bin: refused (nothing runs), named, no traceback."""
    marker = Path("/tmp/unidiffuser_pwned")
    marker.unlink(missing_ok=True)
    entry = tmp_path / "reference_entry"
    entry.mkdir()
    (entry / "<new1>.bin").write_bytes(pickle.dumps({"<new1>": Evil()}))
    refused(capsys, run_entry(sample, sample_args(tiny_config_file, entry, prompts, tmp_path / "out1")),
            r"cannot read token embedding .*<new1>\.bin")
    clip = tmp_path / "evil_clip"
    shutil.copytree(tiny_config.paths.clip_text, clip)
    (clip / "model.safetensors").unlink()
    (clip / "pytorch_model.bin").write_bytes(pickle.dumps({"text_model.x": Evil()}))
    config = tmp_path / "evil_config.py"
    config.write_text(tiny_config_file.read_text().replace(
        "    return config\n", f"    config.paths.clip_text = {str(clip)!r}\n    return config\n"))
    code = run_entry(sample, sample_args(config, tmp_path / "x", prompts, tmp_path / "out2", "--base_model"))
    refused(capsys, code, "cannot load the CLIP text encoder", re.escape(str(clip)))
    assert not marker.exists()
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


# --- resuming training ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interrupted_run(tiny_session_config, public_photos, tmp_path_factory) -> Path:
    """A run of 2 steps with a checkpoint at each step, kept: what a resume reads. Trained once, read-only."""
    root = tmp_path_factory.mktemp("interrupted")
    config_file = write_config_file(tiny_session_config, root / "tiny_test_config.py")
    out = root / "run"
    assert run_entry(train, train_args(config_file, write_photos(root, public_photos), out)) == 0
    (out / META_FILE).unlink()  # as if it had stopped before writing its result
    return out


@pytest.fixture()
def interrupted(interrupted_run, tmp_path) -> Path:
    """This test's copy of the interrupted run (resuming it with the same photos and settings reads it)."""
    return copy_folder(interrupted_run, tmp_path / "run")


@pytest.mark.parametrize("damage, pattern", [
    ("truncated_optimizer", r"cannot read optimizer state .*optimizer\.pt"),
    ("evil_optimizer", r"cannot read optimizer state .*optimizer\.pt"),
    ("corrupt_state", r"cannot read .*training_state\.json.*delete .*checkpoint-000002"),
    ("state_not_a_state", r"training_state\.json is not a training state"),
    ("rank_change", r"trained with other settings: rank: 4 -> 8"),
])
def test_resume_from_a_damaged_or_different_checkpoint(damage, pattern, interrupted, tiny_config_file, photos, capsys):
    checkpoint = list_checkpoints(interrupted)[-1]
    extra = []
    if damage == "truncated_optimizer":
        data = (checkpoint / "optimizer.pt").read_bytes()
        (checkpoint / "optimizer.pt").write_bytes(data[: len(data) // 3])
    elif damage == "evil_optimizer":
        (checkpoint / "optimizer.pt").write_bytes(pickle.dumps({"optimizer": Evil()}))
    elif damage == "corrupt_state":
        (checkpoint / "training_state.json").write_text('{"step": 2, "reci')
    elif damage == "state_not_a_state":
        (checkpoint / "training_state.json").write_text("[2]")
    else:
        extra = ["--rank", "8"]
    before = {p: p.read_bytes() for p in checkpoint.iterdir()}
    code = run_entry(train, train_args(tiny_config_file, photos, interrupted, "--resume", "latest", *extra))
    refused(capsys, code, pattern)
    assert {p: p.read_bytes() for p in checkpoint.iterdir()} == before  # nothing of the checkpoint was touched
    assert not (interrupted / META_FILE).exists()


def test_a_loss_forced_non_finite_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_config_file, photos, capsys):
    out = tmp_path / "diverged"
    code = run_entry(train, train_args(tiny_config_file, photos, out, "--lr", "1e30", "--max_grad_norm", "0",
                                       "--warmup_steps", "0", "--log_every", "1", "--train_step", "4"))
    err = refused(capsys, code, r"(the loss became (nan|inf)|hold NaN or inf) at step \d", "last good checkpoint",
                  "--overwrite")
    from safetensors.torch import load_file

    kept = list_checkpoints(out)
    assert kept and str(kept[-1]) in err
    for checkpoint in kept:
        assert all(bool(t.isfinite().all()) for t in load_file(checkpoint / "trainable.safetensors").values())
    assert not (out / META_FILE).exists()


# --- two writers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["train", "sample"])
def test_two_writers_on_one_folder(script, tmp_path, tiny_config_file, photos, restore, prompts, capsys):
    """The first run is another process holding the folder; the second, the same command line, runs here."""
    out = tmp_path / "shared"
    if script == "train":
        module, args = train, train_args(tiny_config_file, photos, out, "--train_step", "20000",
                                         "--checkpointing_steps", "1000")
    else:
        module, args = sample, sample_args(tiny_config_file, restore, prompts, out, "--steps", "3000")
    command = [sys.executable, str(REPO_ROOT / f"{script}.py"), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    try:
        wait_until((out / ".lock").exists, first, f"{out / '.lock'}")
        holder = json.loads((out / ".lock").read_text())
        assert holder["pid"] == first.pid
        code = run_entry(module, args)
        assert first.poll() is None, "the first run ended before the second started: make it longer"
        refused(capsys, code, f"pid {first.pid}", "in use by another run")
    finally:
        first.terminate()
        first.communicate(timeout=120)


def test_a_stale_lock_is_taken_over(tmp_path, tiny_config_file, restore, prompts, capsys):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (out / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                           "owner": "sample.py", "started": "yesterday"}))
    assert run_entry(sample, sample_args(tiny_config_file, restore, prompts, out, "--n_samples", "1")) == 0
    assert "taking over the lock" in capsys.readouterr().err
    assert not (out / ".lock").exists() and (out / image_name(0, 0)).is_file()


# --- a full disk ------------------------------------------------------------------------------------------


def test_full_disk_while_writing_images(tmp_path, tiny_config_file, restore, prompts, capsys):
    with tmpfs(tmp_path / "small", "size=12k") as small:
        out = small / "out"
        code = run_entry(sample, sample_args(tiny_config_file, restore, prompts, out))
        err = refused(capsys, code, r"cannot write .*\.jpg", r"\d+ of 9 image\(s\) of this run were written",
                      "--skip_existing")
        written = int(re.search(r"(\d+) of 9", err).group(1))
        images = sorted(p for p in out.glob("*.jpg"))
        assert len(images) == written and all(image_is_complete(p) for p in images)
        assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files, no lock left behind
        grow(small, "4m")
        assert run_entry(sample, sample_args(tiny_config_file, restore, prompts, out, "--skip_existing")) == 0
        assert len(list(out.glob("*-*.jpg"))) == 9 and (out / "grid.jpg").is_file()


def test_full_disk_while_training(tmp_path, tiny_config_file, photos, capsys):
    with tmpfs(tmp_path / "small", "size=96k") as small:
        out = small / "run"
        code = run_entry(train, train_args(tiny_config_file, photos, out, "--train_step", "40",
                                           "--checkpointing_steps", "2", "--checkpoints_total_limit", "40"))
        refused(capsys, code, "No space left on device|no space left", "--resume latest|the run starts over")
        leftovers = list((out / CHECKPOINT_DIR).glob(".*.tmp")) if (out / CHECKPOINT_DIR).is_dir() else []
        assert leftovers == []
        for checkpoint in list_checkpoints(out):  # what is listed is complete
            assert {p.name for p in checkpoint.iterdir()} == {"trainable.safetensors", "optimizer.pt",
                                                               "training_state.json"}
        assert not (out / META_FILE).exists() and not (out / ".lock").exists()
        grow(small, "16m")
        assert run_entry(train, train_args(tiny_config_file, photos, out, "--train_step", "40", "--checkpointing_steps",
                                           "2", "--checkpoints_total_limit", "40", "--resume", "latest")) == 0
        assert (out / META_FILE).is_file()


def test_grid_and_images_are_valid_after_a_normal_run(tmp_path, tiny_config_file, restore, prompts):
    """The baseline the fault cases are compared with: every file complete, no lock, no temp file."""
    out = tmp_path / "out"
    assert run_entry(sample, sample_args(tiny_config_file, restore, prompts, out)) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([image_name(p, i) for p in range(3) for i in range(3)]
                                                          + ["grid.jpg"])
    with Image.open(out / "grid.jpg") as grid:
        grid.load()


def test_prompts_over_77_tokens_are_reported(tmp_path, tiny_config_file, photos, restore, capsys):
    """CLIP reads 77 tokens: sample.py and train.py say so instead of cutting the rest silently."""
    long_prompt = "a boy " + "wearing a very long red scarf and " * 12 + "smiling"
    prompts = tmp_path / "long.json"
    prompts.write_text(json.dumps(["a boy smiling", long_prompt]))
    assert run_entry(sample, sample_args(tiny_config_file, restore, prompts, tmp_path / "out", "--n_samples", "1")) == 0
    err = capsys.readouterr().err
    assert re.search(r"warning: prompt 1 is \d+ CLIP tokens; the text encoder reads the first 77", err), err
    assert "prompt 0 is" not in err

    code = run_entry(train, train_args(tiny_config_file, photos, tmp_path / "run", "--train_step", "1",
                                       "--instance_prompt", "{token} {class_word} " + "in a garden " * 30))
    assert code == 0
    assert re.search(r"warning: the prompt .* is \d+ CLIP tokens; training reads the first 77", capsys.readouterr().out)


def test_a_read_only_model_folder_is_hashed_once(tmp_path, monkeypatch):
    """The graders' models/ is mounted read-only: the base checkpoint's hash is remembered in the user's
    cache instead of next to the file, and used while the file's size and mtime match."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with tmpfs(tmp_path / "models", "size=1m") as models:
        weights = models / "uvit_v1.pth"
        weights.write_bytes(os.urandom(300_000))
        subprocess.run(["mount", "-o", "remount,ro", str(models)], check=True)
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        assert cached_sha256(weights) == digest
        assert not (models / "uvit_v1.pth.sha256").exists()
        [entry] = list(hash_cache_dir().iterdir())
        assert hash_cache_dir().is_relative_to(tmp_path / "cache")

        remembered = json.loads(entry.read_text())
        entry.write_text(json.dumps({**remembered, "sha256": "0" * 64}))
        assert cached_sha256(weights) == "0" * 64  # read from the cache, not hashed again
        entry.write_text(json.dumps({**remembered, "sha256": "0" * 64, "mtime_ns": remembered["mtime_ns"] + 1}))
        assert cached_sha256(weights) == digest  # a changed file is hashed again
