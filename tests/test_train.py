"""train.py on the tiny world: what it writes and how sample.py's loader counts it, that it learns, exact
resume, cache = no cache, multi-process training, LoRA targets, and bad inputs refused before any write."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample as sample_script
import train as train_script
from entrypoints import run_entry, script_repo
from libs.files import load_safetensors
from libs.class_images.folder import write_class_set
from libs.config import REPO_ROOT, load_config
from libs.diffusion import add_noise, alphas_cumprod, stable_diffusion_betas
from libs.adapters.lora import LoraSpec, uvit_lora_modules
from libs.models.loading import build_uvit, load_autoencoder, load_text_encoder, load_uvit
from libs.adapters.param_count import count_finetuned_parameters
from libs.personalization import load_personalization
from libs.prompts import fill_prompt
from libs.layout import SUBJECTS, class_word_from_path
from libs.train import TrainingError, ViewSampler, build_models, count_trainable, make_plan, total_loss, train
from libs.train_output import (AUTO_DIR, CHECKPOINT_DIR, LOG_DIR, LOG_FILE, META_FILE, RUN_FILE, TABLE_FILE,
                               TEXT_FULL_FILE, TEXT_LORA_FILE, TOKEN_FILE, UVIT_LORA_FILE, VALIDATION_DIR,
                               list_checkpoints)
from conftest import stop_at


@pytest.fixture()
def class_dir(tmp_path) -> Path:
    folder = tmp_path / "class_data" / "boy"
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(1)
    names = [f"{i:03d}.jpg" for i in range(5)]
    for name in names:
        Image.fromarray(rng.integers(0, 255, (72, 64, 3), dtype=np.uint8)).save(folder / "images" / name)
    write_class_set(folder, names, ["a photo of a boy"] * len(names), {"source": "test"})
    return folder


def configured(config, class_dir: Path | None = None, **train_settings):
    config.train.update(with_prior_preservation=class_dir is not None, class_data_dir=str(class_dir or ""),
                        **train_settings)
    return config


def main_exit(config_file: Path, argv: list) -> int:
    """train.py's parse_args() and main() at the command-line edge, with `config_file` as --config."""
    return run_entry(train_script, ["--config", config_file, *argv])


def lora_and_token(out: Path) -> dict[str, torch.Tensor]:
    tensors = {f"lora/{k}": v for k, v in load_safetensors(out / UVIT_LORA_FILE).items()}
    if (out / TOKEN_FILE).exists():
        tensors.update({f"token/{k}": v for k, v in load_safetensors(out / TOKEN_FILE).items()})
    return tensors


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max().item() <= atol, key


def sample_py_count(config, out: Path) -> int:
    """What sample.py prints as `finetuned parameters`: fresh base models, the personalization loaded, spec §7."""
    nnet, text_encoder, autoencoder = load_uvit(config), load_text_encoder(config), load_autoencoder(config)
    load_personalization(out, nnet, text_encoder)
    return count_finetuned_parameters(config, nnet, autoencoder, text_encoder)


def eval_losses(out: Path) -> list[float]:
    lines = [json.loads(line) for line in (out / LOG_DIR / LOG_FILE).read_text().splitlines()]
    return [line["eval_loss_instance"] for line in lines if "eval_loss_instance" in line]


# --- pieces ---------------------------------------------------------------------------------------


def test_class_word_and_prompts():
    assert class_word_from_path("train_data_crop/boy2") == "boy"
    assert class_word_from_path("train_data/girl1") == "girl"
    assert fill_prompt("a photo of a {token} {class_word}", "<new1>", "girl") == "a photo of a <new1> girl"
    assert fill_prompt("a photo of a {token} {class_word}", None, "boy") == "a photo of a boy"


def test_noise_schedule_and_loss_weights():
    abar = alphas_cumprod()
    assert abar[0] == 1 and torch.allclose(abar[1:], torch.cumprod(1 - stable_diffusion_betas(), 0))
    x0, eps = torch.randn(2, 3), torch.randn(2, 3)
    n = torch.tensor([1, 1000])
    expected = abar[n].sqrt()[:, None] * x0.double() + (1 - abar[n]).sqrt()[:, None] * eps.double()
    torch.testing.assert_close(add_noise(x0, eps, n, abar), expected.float())

    from ml_collections import ConfigDict

    terms = {"instance": torch.tensor(2.0), "class": torch.tensor(3.0), "clip_img": torch.tensor(5.0)}
    weights = ConfigDict(dict(instance_loss_weight=0.5, prior_loss_weight=0.25, clip_img_loss_weight=0.125))
    assert total_loss(terms, weights).item() == 0.5 * 2 + 0.25 * 3 + 0.125 * 5


def test_view_sampler_sees_every_view_once_per_epoch():
    sampler = ViewSampler(num_views=6, batch_size=4, seed=0, rank=0, stream=1)
    seen = torch.cat([sampler(step) for step in (1, 2, 3)])  # 12 draws = 2 epochs
    assert sorted(seen[:6].tolist()) == list(range(6)) and sorted(seen[6:].tolist()) == list(range(6))
    assert torch.equal(ViewSampler(6, 4, 0, 0, 1)(3), sampler(3))  # stateless: what resuming relies on
    assert not torch.equal(ViewSampler(6, 4, 0, 1, 1)(1), sampler(1))  # each process its own views


def test_default_lora_targets_and_parameter_count(tiny_config, photos):
    nnet = load_uvit(tiny_config)
    blocks = [f"in_blocks.{i}" for i in range(2)] + ["mid_block"] + [f"out_blocks.{i}" for i in range(2)]
    expected = {f"{b}.{m}" for b in blocks for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert set(uvit_lora_modules(nnet, tiny_config.train.lora_targets)) == expected | {"text_embed", "clip_img_embed"}
    assert "patch_embed.proj" in uvit_lora_modules(nnet, ["proj", "patch_embed.proj"])

    plan = make_plan(configured(tiny_config), photos, photos.parent / "out")
    models = build_models(plan, torch.device("cpu"), torch.float32)
    r, width = tiny_config.train.rank, tiny_config.nnet.embed_dim
    per_block = r * (width + 3 * width) + r * 2 * width + r * (width + 4 * width) + r * (4 * width + width)
    uvit = 5 * per_block + r * (tiny_config.text_dim + width) + r * (tiny_config.clip_img_dim + width)
    assert count_trainable(models.model.nnet) == uvit
    assert count_trainable(models.model) == uvit + tiny_config.clip_text_dim  # plus the one <new1> row
    assert all(p.dtype == torch.float32 for _, p in models.trainable())


def test_real_model_lora_sizes():
    """The real U-ViT (on the meta device): r=32 default = 24.5 M; the reference entry's r=64 with the bare
    `proj` that also hit the patch embedding = the 49.1 M of spec §6."""
    config = load_config("unidiffuser_v1")
    nnet = build_uvit(config, "meta")
    ours = LoraSpec(r=32, alpha=32, target_modules=uvit_lora_modules(nnet, config.train.lora_targets))
    assert len(ours.target_modules) == 31 * 4 + 2
    assert ours.num_parameters(nnet) == 32 * (31 * 16 * 1536 + (64 + 1536) + (512 + 1536)) == 24_496_128
    reference = LoraSpec(r=64, alpha=32, target_modules=uvit_lora_modules(
        nnet, [*config.train.lora_targets, "patch_embed.proj"]))
    assert reference.num_parameters(nnet) == 49_091_584


# --- end to end -----------------------------------------------------------------------------------


def run_cli(args: list[str], launcher: list[str] | None = None, env: dict[str, str] | None = None):
    command = (launcher or [sys.executable]) + [str(REPO_ROOT / "train.py"), *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)


def test_cli_writes_what_sample_py_loads(tmp_path, tiny_config_file, tiny_config, photos, class_dir, capsys,
                                        fresh_accelerate_state):
    """fp16 as train.sh runs it: frozen weights in fp16, trained tensors in fp32, a loss scaler. train.py and
    sample.py run in this process through their command-line edge (their exit codes through a real interpreter:
    test_train_sh_runs_the_four_subjects_in_order, test_plain_base_as_a_subprocess)."""
    config_file = tiny_config_file
    out = tmp_path / "model_output" / "boy1"
    args = ["--config", str(config_file), "-d", str(photos), "-o", str(out), "--class_data_dir", str(class_dir),
            "--train_step", "3", "--validation_steps", "2", "--mixed_precision", "fp16"]
    assert run_entry(train_script, args) == 0

    for name in (META_FILE, UVIT_LORA_FILE, TOKEN_FILE, RUN_FILE, f"{LOG_DIR}/{LOG_FILE}",
                 f"{VALIDATION_DIR}/step-000002.jpg", f"{VALIDATION_DIR}/step-000003.jpg"):
        assert (out / name).is_file(), name
    assert not (out / TEXT_LORA_FILE).exists() and not (out / CHECKPOINT_DIR).exists()
    with Image.open(out / VALIDATION_DIR / "step-000003.jpg") as grid:
        assert grid.size == (48 + 256, 2 * 256)  # a labelled row per split, the tiny config's one prompt each

    meta = json.loads((out / META_FILE).read_text())
    assert meta["modifier_token"] == "<new1>" and meta["initializer_token"] == "boy" and meta["class_word"] == "boy"
    assert meta["uvit_lora"]["r"] == 4 and meta["base_checkpoint"]["sha256"]
    assert meta["trainable_parameters"] == sample_py_count(tiny_config, out) == 10_624
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["a photo of a boy"]))
    capsys.readouterr()
    assert run_entry(sample_script, ["--config", config_file, "--restore_path", out, "--prompt_path", prompts,
                                     "--output_path", tmp_path / "samples"]) == 0
    assert [line for line in capsys.readouterr().out.splitlines() if "finetuned parameters" in line] == [
        "finetuned parameters: 10624"]
    run = json.loads((out / RUN_FILE).read_text())
    assert run["mixed_precision"] == "fp16"
    assert all(run["versions"][name] != "not installed" for name in ("torch", "transformers", "peft", "accelerate"))
    assert run["config"]["train"]["train_step"] == 3 and len(run["images"]) == 2 + 4  # num_class_images = 4 of the 5
    logged = [json.loads(line) for line in (out / LOG_DIR / LOG_FILE).read_text().splitlines()]
    steps = [line for line in logged if "loss" in line]
    assert [line["step"] for line in steps] == [1, 2, 3]
    assert all({"loss_instance", "loss_class", "loss_clip_img", "lr", "grad_norm"} <= set(line) for line in steps)



def test_finished_output_is_never_overwritten_silently(tiny_config_file, photos, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["-d", str(photos), "-o", str(out), "--no_prior_preservation", "--train_step", "1"]
    assert main_exit(tiny_config_file, args) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main_exit(tiny_config_file, args) == 2
    error = capsys.readouterr().err
    assert "already holds a finished personalization" in error and "--overwrite" in error
    assert main_exit(tiny_config_file, args + ["--resume", "latest"]) == 0
    assert "nothing to resume" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    assert main_exit(tiny_config_file, args + ["--overwrite", "--train_step", "2"]) == 0
    assert json.loads((out / META_FILE).read_text())["steps"] == 2


def test_loss_goes_down_on_a_tiny_subject(tiny_config, photos, tmp_path):
    config = configured(tiny_config, lr=1e-2, train_step=40, log_every=10, checkpointing_steps=100)
    train(config, photos, tmp_path / "out")
    start, end = eval_losses(tmp_path / "out")
    assert end < 0.93 * start, (start, end)  # about 0.88 x start at the time of writing


def test_resume_continues_exactly(tiny_config, tiny_config_file, photos, class_dir, tmp_path):
    def config():
        return configured(deepcopy(tiny_config), class_dir, train_step=6, checkpointing_steps=3,
                          lr_scheduler="cosine", warmup_steps=2, lora_dropout=0.1, hflip=True)

    straight = tmp_path / "straight"
    train(config(), photos, straight)

    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train(config(), photos, resumed, on_step=stop_at(4))
    assert [p.name for p in list_checkpoints(resumed)] == ["checkpoint-000003"]
    assert not (resumed / META_FILE).exists()
    # without --resume an unfinished run is refused (the message says --resume latest)
    assert main_exit(tiny_config_file, ["-d", photos, "-o", resumed, "--class_data_dir", class_dir, "--train_step", "6",
                                        "--checkpointing_steps", "3", "--lr_scheduler", "cosine", "--warmup_steps", "2",
                                        "--lora_dropout", "0.1", "--hflip"]) == 2

    with pytest.raises(TrainingError, match=r"other settings: lr: 0\.001 -> 0\.002"):
        train(configured(config(), class_dir, lr=2e-3), photos, resumed, resume="latest")
    train(config(), photos, resumed, resume="latest")
    assert_same_tensors(lora_and_token(straight), lora_and_token(resumed), atol=1e-6)
    assert not (resumed / CHECKPOINT_DIR).exists()
    steps = [json.loads(line)["step"] for line in (resumed / LOG_DIR / LOG_FILE).read_text().splitlines()]
    assert steps == [json.loads(line)["step"] for line in (straight / LOG_DIR / LOG_FILE).read_text().splitlines()]


def test_cached_path_equals_uncached_path(tiny_config, photos, class_dir, tmp_path):
    outs = {}
    for cached in (True, False):
        config = configured(deepcopy(tiny_config), class_dir, train_step=3, cache_latents=cached)
        outs[cached] = tmp_path / f"cached_{cached}"
        train(config, photos, outs[cached])
    assert_same_tensors(lora_and_token(outs[True]), lora_and_token(outs[False]), atol=1e-5)


@pytest.mark.parametrize("mode, files", [("lora", {TOKEN_FILE, TEXT_LORA_FILE}), ("full", {TOKEN_FILE, TEXT_FULL_FILE}),
                                         ("frozen", set())])
def test_text_encoder_modes_count_what_they_train(tiny_config, photos, class_dir, tmp_path, mode, files):
    config = configured(tiny_config, class_dir, train_step=2, text_encoder_mode=mode, num_vectors=2)
    result = train(config, photos, tmp_path / mode)
    written = {p.name for p in result.files}
    assert written == {META_FILE, UVIT_LORA_FILE} | files
    assert result.trainable_parameters == sample_py_count(tiny_config, tmp_path / mode)
    if mode != "frozen":
        assert load_safetensors(tmp_path / mode / TOKEN_FILE)["<new1>"].shape == (2, tiny_config.clip_text_dim)


@pytest.mark.slow
def test_two_processes_with_gloo(tmp_path, tiny_config_file, tiny_config, photos, class_dir):
    """accelerate's torchrun launcher with two CPU processes (gloo); only the main process writes.
    (`accelerate launch --cpu --num_processes 2` starts one process unless mpirun is set up.)"""
    out = tmp_path / "out"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(29_500 + os.getpid() % 1000)]
    done = run_cli(["--config", str(tiny_config_file), "-d", str(photos), "-o", str(out),
                    "--class_data_dir", str(class_dir), "--train_step", "3"],
                   launcher=launcher, env={"ACCELERATE_USE_CPU": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1
    assert json.loads((out / RUN_FILE).read_text())["num_processes"] == 2
    assert json.loads((out / META_FILE).read_text())["trainable_parameters"] == sample_py_count(tiny_config, out)


@pytest.mark.slow
def test_train_sh_runs_the_four_subjects_in_order(tmp_path, tiny_config_file, public_photos):
    """From another working directory; crops preferred over raw photos; stops at the first failure; a re-run
    skips finished subjects; extra flags reach train.py (the re-run's `./train.sh --auto_recipe`: a recipe search
    per subject, each with its table and winner)."""
    repo = script_repo(tmp_path / "repo")

    def subject(folder: Path) -> None:
        folder.mkdir(parents=True)
        public_photos["astronaut"].save(folder / "a.jpg")

    subject(repo / "train_data_crop" / "boy1")
    (repo / "train_data" / "boy1").mkdir(parents=True)  # empty: must not be used, the crops exist
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE": str(Path(sys.executable).parent / "accelerate")}
    command = [str(repo / "train.sh"), "--config", str(tiny_config_file), "--train_step", "1"]

    first = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 1
    assert "no photos for boy2" in first.stderr and "=== girl1" not in first.stdout
    assert "=== boy1: train_data_crop/boy1" in first.stdout
    assert "without prior preservation" in first.stderr
    assert json.loads((repo / "model_output" / "boy1" / META_FILE).read_text())["steps"] == 1
    assert not (repo / "model_output" / "boy2").exists()

    subject(repo / "train_data" / "boy2")
    subject(repo / "train_data" / "girl1")
    subject(repo / "train_data" / "girl2")
    finished = (repo / "model_output" / "boy1" / UVIT_LORA_FILE).stat().st_mtime_ns
    search = ["--auto_recipe", "--auto_recipes", "base", "half_rank", "--validation_steps", "1",
              "--validation_face_backend", "none"]
    second = subprocess.run(command + search, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (repo / "model_output" / "boy1" / UVIT_LORA_FILE).stat().st_mtime_ns == finished
    assert second.stdout.count("nothing to resume") == 1
    assert second.stdout.index("=== boy1: train_data_crop/boy1") < second.stdout.index("=== boy2: train_data/boy2")
    for name in SUBJECTS:
        meta = json.loads((repo / "model_output" / name / META_FILE).read_text())
        assert meta["steps"] == 1
        if name != "boy1":  # the re-run's flags reached train.py: a search per subject
            assert meta["auto_recipe"]["winner"] in ("base", "half_rank")
            assert (repo / "model_output" / name / AUTO_DIR / TABLE_FILE).is_file()
    assert json.loads((repo / "model_output" / "girl2" / META_FILE).read_text())["class_word"] == "girl"


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case, message", [
    ("empty", "no photos"),
    ("not_images", r"no photos .*notes\.txt"),
    ("corrupt", r"cannot read image .*broken\.jpg"),
    ("no_class_set", r"class image folder not found.*no_prior_preservation"),
    ("out_is_file", "is a file, not a folder"),
    ("token_missing", "does not contain the token"),
])
def test_bad_input_is_refused_before_writing(tiny_config_file, photos, tmp_path, capsys, case, message):
    data, out = photos, tmp_path / "out"
    args = ["--no_prior_preservation"]
    if case == "empty":
        data = tmp_path / "empty_boy"
        data.mkdir()
    elif case == "not_images":
        data = tmp_path / "notes_boy"
        data.mkdir()
        (data / "notes.txt").write_text("photos come later")
    elif case == "corrupt":
        (photos / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    elif case == "no_class_set":
        args = ["--with_prior_preservation", "--class_data_dir", str(tmp_path / "nowhere")]
    elif case == "out_is_file":
        out = tmp_path / "out.txt"
        out.write_text("keep me")
    elif case == "token_missing":
        args += ["--instance_prompt", "a photo of a {class_word}"]
    assert main_exit(tiny_config_file, ["-d", data, "-o", out, *args]) == 2
    assert re.search(message, capsys.readouterr().err, re.S)
    if case == "out_is_file":
        assert out.read_text() == "keep me"
    else:
        assert not out.exists()


def test_a_checkpoint_written_in_the_background_holds_its_step(tmp_path):
    """CheckpointWriter returns before the files are written; the checkpoint still holds the tensors and
    optimizer state of the step it was asked for, although training changes them in place meanwhile, and a
    failed write is raised by the next call."""
    from libs.train.checkpoints import CheckpointError, CheckpointWriter, load_checkpoint

    def fresh():
        model = torch.nn.Linear(4, 3)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    def step(model, optimizer):
        model(torch.ones(2, 4)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    model, optimizer, scheduler = fresh()
    step(model, optimizer)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    writer = CheckpointWriter()
    writer.save(tmp_path, 1, model, optimizer, scheduler, None, {"recipe": {}}, keep=2)
    for _ in range(3):
        step(model, optimizer)
    writer.wait()
    restored, restored_optimizer, restored_scheduler = fresh()
    load_checkpoint(list_checkpoints(tmp_path)[-1], restored, restored_optimizer, restored_scheduler, None)
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in expected.items())
    assert int(restored_optimizer.state_dict()["state"][0]["step"]) == 1

    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    writer.save(blocked, 2, model, optimizer, scheduler, None, {"recipe": {}}, keep=2)
    with pytest.raises(CheckpointError, match="cannot write the checkpoint of step 2"):
        writer.wait()
    writer.wait()  # the error is raised once
