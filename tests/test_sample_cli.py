"""sample.py end to end on the tiny world: file names, resuming, stable seeds, the changed-parameter
line, the reference entry's layout, and bad input rejected before anything is written."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from libs.config import REPO_ROOT, latent_shape
from libs.adapters.lora import LoraSpec, add_lora, uvit_lora_modules
from libs.models.loading import load_text_encoder, load_uvit
from libs.personalization import save_personalization
import sample
from entrypoints import run_entry
from sample import main, parse_args

STEPS = "3"
PROMPTS = ["a boy standing in the wild", "a girl at the beach", "a photo of a cowboy"]
NAME = re.compile(r"(\d+)-(\d{3})\.jpg")
COUNT_LINE = re.compile(r"^finetuned parameters: (\d+)$", re.MULTILINE)


@pytest.fixture()
def config_file(tiny_config_file: Path) -> Path:
    return tiny_config_file


@pytest.fixture()
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(PROMPTS))
    return path


@pytest.fixture()
def base_dir(tmp_path) -> Path:
    """A restore path without a personalization: the plain base model."""
    path = tmp_path / "base"
    path.mkdir()
    return path


def lora_numel(module: nn.Module, r: int) -> int:
    """What a rank-r LoRA adds to one layer, written out independently of libs.adapters."""
    if isinstance(module, nn.Conv2d):
        return r * (module.in_channels * module.kernel_size[0] * module.kernel_size[1] + module.out_channels)
    return r * (module.in_features + module.out_features)


def randomize_lora_b(model: nn.Module) -> None:
    """peft starts lora_B at zero; trained adapters are not."""
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)


@pytest.fixture()
def ours_dir(tiny_config, tmp_path) -> tuple[Path, int]:
    """A tiny personalization in our format (U-ViT LoRA r=2 + the <new1> token) and its trained-parameter count."""
    nnet = load_uvit(tiny_config)
    text_encoder = load_text_encoder(tiny_config)
    spec = LoraSpec(r=2, alpha=4.0, target_modules=uvit_lora_modules(nnet))
    modules = dict(nnet.named_modules())
    expected = sum(lora_numel(modules[name], 2) for name in spec.target_modules) + tiny_config.clip_text_dim
    add_lora(nnet, spec)
    randomize_lora_b(nnet)
    text_encoder.add_modifier_token("<new1>", "boy")
    out = tmp_path / "ours"
    save_personalization(out, {"modifier_token": "<new1>", "class_word": "boy", "text_encoder_mode": "token",
                               "uvit_lora": spec.to_dict()}, nnet, text_encoder)
    return out, expected


def reference_entry(tiny_config, folder: Path, r: int = 4, lora_file: str = "lora.pt.tmp") -> int:
    """The reference entry's layout, made like it did: peft on bare names (`proj` also hits the patch-embedding
    conv), a plain state dict of the LoRA tensors, and `<new1>.bin` holding one token vector."""
    nnet = load_uvit(tiny_config)
    targets = ["qkv", "fc1", "fc2", "proj", "text_embed", "clip_img_embed"]
    hit = [m for n, m in nnet.named_modules() if n.rsplit(".", 1)[-1] in targets and isinstance(m, (nn.Linear, nn.Conv2d))]
    assert any(isinstance(m, nn.Conv2d) for m in hit)
    model = get_peft_model(nnet, LoraConfig(r=r, lora_alpha=32, lora_dropout=0.1, target_modules=targets))
    randomize_lora_b(model)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({k: v for k, v in model.state_dict().items() if "lora_" in k}, folder / lora_file)
    torch.save({"<new1>": torch.randn(tiny_config.clip_text_dim)}, folder / "<new1>.bin")
    return sum(lora_numel(m, r) for m in hit) + tiny_config.clip_text_dim


def run(config_file: Path, restore: Path, prompts: Path, out: Path, *extra: str) -> None:
    main(parse_args(["--config", str(config_file), "--restore_path", str(restore), "--prompt_path", str(prompts),
                     "--output_path", str(out), "--steps", STEPS, "--device", "cpu", *extra]))


def run_cli_exit(config_file: Path, restore: Path, prompts: Path, out: Path, *extra: str) -> int:
    """sample.py at its command-line edge: the exit status."""
    return run_entry(sample, ["--config", config_file, "--restore_path", restore, "--prompt_path", prompts,
                              "--output_path", out, "--steps", STEPS, "--device", "cpu", *extra])


def image_files(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in folder.iterdir() if NAME.fullmatch(p.name)}


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def only_count(stdout: str) -> int:
    assert stdout.count("finetuned parameters") == 1, stdout
    return int(COUNT_LINE.search(stdout).group(1))


def test_personalized_run_writes_three_jpegs_per_prompt(config_file, prompt_file, ours_dir, tmp_path, tiny_config, capsys):
    restore, expected = ours_dir
    out = tmp_path / "out"
    run(config_file, restore, prompt_file, out)
    stdout = capsys.readouterr().out
    assert only_count(stdout) == expected
    assert "ours personalization" in stdout and "token <new1>" in stdout
    assert "a <new1> boy standing in the wild" in stdout  # rewritten for the model ...
    assert "a <new1> girl" not in stdout  # ... only for the trained class word

    files = image_files(out)
    assert sorted(files) == [f"{p}-{i:03}.jpg" for p in range(len(PROMPTS)) for i in range(3)]
    for path in files.values():
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size == (tiny_config.resolution, tiny_config.resolution)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    with Image.open(out / "grid.jpg") as grid:
        assert grid.height == len(PROMPTS) * 160

    # resuming: nothing left to do, nothing rewritten
    stamps = {name: path.stat().st_mtime_ns for name, path in files.items()}
    run(config_file, restore, prompt_file, out, "--skip_existing")
    stdout = capsys.readouterr().out
    assert "nothing to sample" in stdout and only_count(stdout) == expected
    assert {name: path.stat().st_mtime_ns for name, path in image_files(out).items()} == stamps

    # an interrupted run: one image lost, only that one is made again, the same image as before (its noise is
    # keyed by its indices; made alone instead of in a batch of 3, float sums may only be reordered)
    lost = pixels(files["1-002.jpg"])
    files["1-002.jpg"].unlink()
    run(config_file, restore, prompt_file, out, "--skip_existing")
    assert "wrote 1 image(s)" in capsys.readouterr().out
    diff = np.abs(pixels(out / "1-002.jpg") - lost)
    assert diff.max() <= 2 and diff.mean() < 0.05


def test_images_do_not_depend_on_other_prompts_or_batch_size(config_file, base_dir, tmp_path):
    def sample(prompts: list[str], out: Path, batch_size: str) -> None:
        path = tmp_path / f"{out.name}.json"
        path.write_text(json.dumps(prompts))
        run(config_file, base_dir, path, out, "--n_samples", "2", "--batch_size", batch_size, "--base_model")

    first, second = tmp_path / "first", tmp_path / "second"
    sample(PROMPTS[:2], first, "2")
    sample([PROMPTS[0], "a different second prompt", "an added third prompt"], second, "1")
    assert len(image_files(first)) == 4 and len(image_files(second)) == 6
    for i in range(2):
        diff = np.abs(pixels(first / f"0-{i:03}.jpg") - pixels(second / f"0-{i:03}.jpg"))
        assert diff.max() <= 2 and diff.mean() < 0.05, i  # another batch may only reorder float sums
    # the random tiny text encoder moves pixels only a little; a changed prompt is still far above that bound
    assert np.abs(pixels(first / "1-000.jpg") - pixels(second / "1-000.jpg")).mean() > 0.5
    assert np.abs(pixels(first / "0-000.jpg") - pixels(first / "0-001.jpg")).mean() > 5


def test_reference_entry_layout(config_file, prompt_file, tiny_config, tmp_path, capsys):
    restore = tmp_path / "reference"
    expected = reference_entry(tiny_config, restore)
    run(config_file, restore, prompt_file, tmp_path / "out", "--n_samples", "1", "--cfg_mode", "empty_token")
    stdout = capsys.readouterr().out
    assert only_count(stdout) == expected
    assert "reference_entry personalization" in stdout and "r=4 alpha=32.0" in stdout
    assert "a <new1> girl at the beach" in stdout  # no class word recorded: both defaults rewritten
    assert sorted(image_files(tmp_path / "out")) == ["0-000.jpg", "1-000.jpg", "2-000.jpg"]


def test_reference_entry_lora_acts_like_the_peft_model(tiny_config, tmp_path):
    """The reader rebuilds rank, alpha (32 / r scaling) and targets exactly: same output as the peft model."""
    from libs.personalization import load_personalization

    restore = tmp_path / "reference"
    reference_entry(tiny_config, restore, lora_file="lora.pt")
    peft_model = get_peft_model(load_uvit(tiny_config), LoraConfig(
        r=4, lora_alpha=32, target_modules=["qkv", "fc1", "fc2", "proj", "text_embed", "clip_img_embed"]))
    peft_model.load_state_dict(torch.load(restore / "lora.pt", weights_only=True), strict=False)
    nnet, text_encoder = load_uvit(tiny_config), load_text_encoder(tiny_config)
    found = load_personalization(restore, nnet, text_encoder)
    assert found.kind == "reference_entry" and found.modifier_token == "<new1>"
    assert "patch_embed.proj" in found.meta["uvit_lora"]["target_modules"]

    g = torch.Generator().manual_seed(1)
    args = (torch.randn(2, *latent_shape(tiny_config), generator=g), torch.randn(2, 1, tiny_config.clip_img_dim, generator=g),
            torch.randn(2, 77, tiny_config.text_dim, generator=g), torch.tensor([10.0, 900.0]), torch.zeros(2),
            torch.ones(2, dtype=torch.long))
    with torch.no_grad():
        assert torch.allclose(nnet(*args)[0], peft_model.eval()(*args)[0], atol=1e-5)


def test_plain_base_as_a_subprocess(config_file, prompt_file, base_dir, tmp_path):
    command = [sys.executable, str(REPO_ROOT / "sample.py"), "--config", str(config_file), "--weight_dir",
               str(base_dir), "--prompt_path", str(prompt_file), "--output_path", str(tmp_path / "out"),
               "--steps", STEPS, "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    refused = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "holds nothing (an empty folder)" in refused.stderr and "--base_model" in refused.stderr
    assert "finetuned parameters" not in refused.stdout and not (tmp_path / "out").exists()
    done = subprocess.run(command + ["--base_model"], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr
    assert only_count(done.stdout) == 0
    assert "no personalization" in done.stdout
    assert sorted(image_files(tmp_path / "out")) == [f"{p}-{i:03}.jpg" for p in range(len(PROMPTS)) for i in range(3)]


def corrupt(folder: Path, tiny_config) -> None:
    (folder / "uvit_lora.safetensors").write_bytes(b"not a safetensors file")


def wrong_shapes(folder: Path, tiny_config) -> None:
    """LoRA trained on another base: its qkv adapter has the wrong input width."""
    from safetensors.torch import load_file

    state = load_file(folder / "uvit_lora.safetensors")
    key = next(k for k in state if k.endswith("qkv.lora_A.weight"))
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 1)
    save_file(state, folder / "uvit_lora.safetensors")


def foreign_targets(folder: Path, tiny_config) -> None:
    """personalization.json names a LoRA target this U-ViT does not have (a deeper base model's block)."""
    meta = json.loads((folder / "personalization.json").read_text())
    meta["uvit_lora"]["target_modules"].append("in_blocks.99.attn.qkv")
    (folder / "personalization.json").write_text(json.dumps(meta))


def reference_foreign_targets(folder: Path, tiny_config) -> None:
    shutil.rmtree(folder)
    reference_entry(tiny_config, folder)
    state = torch.load(folder / "lora.pt.tmp", weights_only=True)
    state = {k.replace(".in_blocks.0.", ".in_blocks.99."): v for k, v in state.items()}
    torch.save(state, folder / "lora.pt.tmp")


def reference_wrong_rank(folder: Path, tiny_config) -> None:
    """lora_A says rank 2, lora_B was saved for rank 4."""
    shutil.rmtree(folder)
    reference_entry(tiny_config, folder)
    state = torch.load(folder / "lora.pt.tmp", weights_only=True)
    state = {k: v[:2] if "lora_A" in k else v for k, v in state.items()}
    torch.save(state, folder / "lora.pt.tmp")


def reference_mixed_rank(folder: Path, tiny_config) -> None:
    shutil.rmtree(folder)
    reference_entry(tiny_config, folder)
    state = torch.load(folder / "lora.pt.tmp", weights_only=True)
    for key in [k for k in state if ".in_blocks.0.attn.qkv." in k]:
        state[key] = state[key][:2] if "lora_A" in key else state[key][:, :2]
    torch.save(state, folder / "lora.pt.tmp")


def reference_token_clash(folder: Path, tiny_config) -> None:
    """A "new" token that is an ordinary CLIP word."""
    shutil.rmtree(folder)
    reference_entry(tiny_config, folder)
    (folder / "<new1>.bin").unlink()
    torch.save({"boy": torch.randn(tiny_config.clip_text_dim)}, folder / "boy.bin")


def reference_unreadable(folder: Path, tiny_config) -> None:
    shutil.rmtree(folder)
    reference_entry(tiny_config, folder)
    (folder / "<new1>.bin").write_bytes(b"garbage")


@pytest.mark.parametrize("damage, message", [
    (corrupt, "cannot read U-ViT LoRA"),
    (wrong_shapes, "does not fit this base model"),
    (reference_wrong_rank, "does not fit this base model"),
    (foreign_targets, "personalization.json adapts modules this model does not have: ['in_blocks.99.attn.qkv']"),
    (reference_foreign_targets, "lora.pt.tmp adapts modules this model does not have: ['in_blocks.99."),
    (reference_mixed_rank, "different ranks"),
    (reference_unreadable, "cannot read token embedding"),
    (reference_token_clash, "cannot add token 'boy'"),
])
def test_bad_adapter_files_are_rejected(config_file, prompt_file, ours_dir, tiny_config, tmp_path, capsys, damage, message):
    restore, _ = ours_dir
    damage(restore, tiny_config)
    out = tmp_path / "out"
    assert run_cli_exit(config_file, restore, prompt_file, out) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err
    assert "finetuned parameters" not in captured.out
    assert not out.exists()


@pytest.mark.parametrize("case, message", [
    ("missing_prompts", "prompt file not found"),
    ("not_json", "not valid JSON"),
    ("not_a_list", "list of strings"),
    ("not_strings", "list of strings"),
    ("empty", "no prompts"),
    ("missing_restore", "is not a folder"),
    ("output_is_file", "is a file"),
])
def test_bad_input_is_rejected_before_writing(config_file, prompt_file, base_dir, tmp_path, capsys, case, message):
    prompts, restore, out = prompt_file, base_dir, tmp_path / "out"
    if case == "missing_prompts":
        prompts = tmp_path / "nope.json"
    elif case in ("not_json", "not_a_list", "not_strings", "empty"):
        prompt_file.write_text({"not_json": "[1, ", "not_a_list": '"a boy"', "not_strings": '["a boy", null]',
                                "empty": "[]"}[case])
    elif case == "missing_restore":
        restore = tmp_path / "no_such_model"
    else:
        out.write_text("a file")
    extra = [] if case == "missing_restore" else ["--base_model"]
    assert run_cli_exit(config_file, restore, prompts, out, *extra) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err
    assert "finetuned parameters" not in captured.out
    if case == "output_is_file":
        assert out.read_text() == "a file"
    else:
        assert not out.exists()
