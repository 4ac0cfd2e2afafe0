"""Adapter families (libs/adapters/families.py) on the tiny world: each trains, is saved, reloaded strictly by
sample.py's pipeline into the same images, and counted (spec §7) exactly as its definition says; LoRA's output
is today's; a family that cannot adapt a target, or a folder of another family or size, is refused."""
from __future__ import annotations

import json
import math
import re
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch

import train as train_script
from libs.adapters.families import FAMILIES, AdapterSpec, add_adapter
from libs.files import load_safetensors
from libs.errors import UserError
from libs.adapters.lora import LoraSpec, add_lora, lora_state_dict, uvit_lora_modules
from libs.models.loading import load_uvit
from libs.train_output import META_FILE, TEXT_LORA_FILE, TOKEN_FILE, UVIT_ADAPTER_FILE, UVIT_LORA_FILE
from libs.photos import open_image
from libs.sample.files import save_jpeg
from libs.sample.pipeline import load_pipeline
from libs.train import METRICS, Rendered, ValidationScores, build_models, count_trainable, make_plan, train
from libs.train.param_budget import planned_parameters
from tests.conftest import tiny_world_config
from tests.entrypoints import run_entry

STEPS = 2


def _most_square(dim: int) -> tuple[int, int]:
    """(m, n), m <= n, m * n = dim, as close to a square as divisors allow (LoKr's automatic factors)."""
    m = max(d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0)
    return m, dim // m


def independent_count(spec: AdapterSpec, shapes: dict[str, tuple[int, int]]) -> int:
    """The trained values of `spec` on Linear targets of (out, in) shapes, from each family's definition."""
    total = 0
    for name in spec.target_modules:
        out_f, in_f = shapes[name]
        r = spec.r
        if spec.family == "lora":
            total += r * (in_f + out_f)  # A: r x in, B: out x r
        elif spec.family == "dora":
            total += r * (in_f + out_f) + out_f  # LoRA + one magnitude per output row
        elif spec.family == "loha":
            total += 2 * r * (in_f + out_f)  # two low-rank pairs, multiplied elementwise
        elif spec.family == "lokr":
            (out_l, out_k), (in_m, in_n) = _most_square(out_f), _most_square(in_f)
            w2 = r * (out_k + in_n) if r < max(out_k, in_n) / 2 else out_k * in_n
            total += out_l * in_m + w2  # kron(w1, w2) with w2 low-rank only when that is smaller
        elif spec.family == "vera":
            total += r + out_f  # lambda_d (rank) and lambda_b (out): the projections are seeded, not trained
        elif spec.family == "oft":
            b = spec.block_size
            total += (in_f // b) * b * (b - 1) // 2  # one skew-symmetric b x b block per b inputs
    return total


@pytest.fixture(scope="module")
def subject(public_photos, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("subject") / "boy1"
    folder.mkdir()
    public_photos["astronaut"].save(folder / "astronaut.jpg", quality=95)
    public_photos["grace_hopper"].save(folder / "grace_hopper.jpeg", quality=95)
    return folder


def family_config(tiny_world: Path, family: str):
    config = deepcopy(tiny_world_config(tiny_world))
    config.train.update(adapter=family, with_prior_preservation=False, train_step=STEPS, validation_steps=STEPS,
                        selection="last", lr=1e-2)
    return config


@pytest.fixture(scope="module", params=[
    "lora", "dora", pytest.param("loha", marks=pytest.mark.slow), pytest.param("lokr", marks=pytest.mark.slow),
    "vera", pytest.param("oft", marks=pytest.mark.slow)])
def trained(request, tiny_world, subject, tmp_path_factory):
    """One short training per family, with the last step's images as the in-memory model rendered them."""
    family = request.param
    config = family_config(tiny_world, family)
    rendered: dict[int, Rendered] = {}

    def keep(step_images: Rendered) -> ValidationScores:
        rendered[step_images.step] = step_images
        return ValidationScores({metric: 0.0 for metric in METRICS}, "test", True)

    out = tmp_path_factory.mktemp(f"adapter_{family}") / "boy1"
    result = train(config, subject, out, score_fn=keep)
    return family, config, out, result, rendered[STEPS]


def test_each_family_counts_what_it_trained_and_reloads_into_the_same_images(trained, tmp_path):
    family, config, out, result, last = trained
    meta = json.loads((out / META_FILE).read_text())
    adapter_file = UVIT_LORA_FILE if family == "lora" else UVIT_ADAPTER_FILE
    entry = meta["uvit_lora"] if family == "lora" else meta["uvit_adapter"]
    assert entry.get("family", "lora") == family and not (out / (UVIT_ADAPTER_FILE if family == "lora" else UVIT_LORA_FILE)).exists()
    spec = AdapterSpec.from_dict(entry)

    nnet = load_uvit(config)
    modules = dict(nnet.named_modules())
    shapes = {name: tuple(modules[name].weight.shape) for name in spec.target_modules}
    saved = sum(t.numel() for t in load_safetensors(out / adapter_file).values())
    saved += sum(t.numel() for t in load_safetensors(out / TOKEN_FILE).values())

    pipeline = load_pipeline(config, "cpu", out, count_parameters=True)
    expected = independent_count(spec, shapes) + config.clip_text_dim  # + the <new1> row
    assert pipeline.finetuned_parameters == meta["trainable_parameters"] == result.trainable_parameters == saved == expected

    merged = dict(pipeline.nnet.named_modules())
    moved = [name for name in spec.target_modules
             if not torch.allclose(getattr(merged[name], "base_layer", merged[name]).weight, modules[name].weight)]
    assert len(moved) == len(spec.target_modules), family  # every adapted weight changed in 2 steps at lr 1e-2

    vset = last.validation_set
    items = vset.items()
    images = pipeline.generate([item.sampled for item in items], [vset.generator(item) for item in items],
                               steps=int(config.train.validation_sample_steps))
    for item, image in zip(items, images):  # validation keeps its images as saved (JPEG): compare the same way
        save_jpeg(image, tmp_path / "reloaded.jpg")
        reloaded = np.asarray(open_image(tmp_path / "reloaded.jpg"), dtype=np.float32)
        in_memory = np.asarray(last.images[item.split][item.index][item.idx], dtype=np.float32)
        assert np.abs(reloaded - in_memory).mean() < 0.05, (family, item)  # another adapter: ~5 per pixel


def test_lora_is_todays_adapter_bitwise(tiny_config):
    """--adapter lora injects what libs.lora did before families existed (same peft config, same initial
    tensors, the same personalization.json entry), so its files and count are today's."""
    reference = load_uvit(tiny_config)
    ours = load_uvit(tiny_config)
    targets = uvit_lora_modules(reference, list(tiny_config.train.lora_targets))
    torch.manual_seed(3)
    add_lora(reference, LoraSpec(r=4, alpha=4.0, dropout=0.1, target_modules=targets))
    torch.manual_seed(3)
    spec = AdapterSpec.from_config(tiny_config.train, targets, int(tiny_config.seed))
    add_adapter(ours, spec)
    a, b = lora_state_dict(reference), lora_state_dict(ours)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert spec.to_dict() == LoraSpec(r=4, alpha=4.0, dropout=0.1, target_modules=targets).to_dict()
    assert spec.prefix == "lora_"


def test_every_family_identity_at_start_and_trains_only_its_own_tensors(tiny_config):
    """Freshly injected, each family leaves the U-ViT's output unchanged, and its trained tensors (peft's
    prefix) are exactly the parameters the injection added."""
    base = load_uvit(tiny_config)
    before = {name for name, _ in base.named_parameters()}
    targets = uvit_lora_modules(base, list(tiny_config.train.lora_targets))
    inputs = [torch.randn(1, 4, 8, 8), torch.randn(1, 1, tiny_config.clip_img_dim), torch.randn(1, 77, tiny_config.text_dim),
              torch.tensor([500.0]), torch.tensor([0.0]), torch.tensor([1])]
    with torch.no_grad():
        expected = base(*inputs)
    for family in FAMILIES:
        tiny_config.train.adapter = family
        model = add_adapter(load_uvit(tiny_config), AdapterSpec.from_config(tiny_config.train, targets, 7))
        spec = AdapterSpec.from_config(tiny_config.train, targets, 7)
        model.eval()
        with torch.no_grad():
            got = model(*inputs)
        assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(expected, got)), family
        added = {n for n, _ in model.named_parameters() if n.replace(".base_layer.", ".") not in before}
        assert added == {n for n, _ in model.named_parameters() if spec.prefix in n} and added, family


@pytest.mark.parametrize("family, targets, message", [
    ("vera", ["qkv", "patch_embed.proj"], r"adapter vera cannot adapt patch_embed\.proj \(a Conv2d; vera adapts Linear"),
    ("oft", ["qkv"], r"adapter oft cannot adapt in_blocks\.0\.attn\.qkv: its input size 32 is not a multiple of "
                     r"--oft_block_size 5"),
])
def test_a_family_that_cannot_adapt_a_target_is_refused_at_start(tiny_config_file, subject, tmp_path, capsys, family,
                                                                   targets, message):
    out = tmp_path / "out"
    code = run_entry(train_script, ["--config", tiny_config_file, "-d", subject, "-o", out, "--no_prior_preservation",
                                    "--adapter", family, "--oft_block_size", "5", "--lora_targets", *targets])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and re.search(message, lines[0]), err
    assert not out.exists() or not any(p.name != ".lock" for p in out.rglob("*")), list(out.rglob("*"))


@pytest.mark.parametrize("trained", ["vera"], indirect=True)
def test_a_folder_of_another_family_or_size_is_refused_naming_the_difference(trained, tmp_path):
    _, config, out, _, _ = trained
    folder = tmp_path / "changed"
    folder.mkdir()
    for path in out.iterdir():
        if path.is_file():
            (folder / path.name).write_bytes(path.read_bytes())
    meta = json.loads((folder / META_FILE).read_text())
    meta["uvit_adapter"]["r"] += 1  # the same family, another size
    (folder / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"does not fit this base model[\s\S]*shape"):
        load_pipeline(config, "cpu", folder)
    meta["uvit_adapter"] = {**meta["uvit_adapter"], "family": "loha", "alpha": 4.0, "r": 4}  # another family
    (folder / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"does not fit this base model[\s\S]*hada_"):
        load_pipeline(config, "cpu", folder)


@pytest.mark.parametrize("settings", [
    {}, {"adapter": "vera"}, {"adapter": "oft", "text_encoder_mode": "frozen"},
    {"adapter": "none", "text_encoder_mode": "lora"}, {"adapter": "lokr", "text_encoder_mode": "full", "num_vectors": 2}])
def test_the_count_before_training_is_what_training_counts(tiny_config, photos, tmp_path, settings):
    """--auto_max_parameters leaves recipes out by this count: it must be the run's own."""
    tiny_config.train.update(with_prior_preservation=False, **settings)
    models = build_models(make_plan(tiny_config, photos, tmp_path / "out"), torch.device("cpu"),
                          torch.float32)
    assert planned_parameters(tiny_config) == count_trainable(models.model) > 0


def test_text_only_trains_no_uvit_adapter_and_counts_what_it_trained(tiny_config, photos, tmp_path):
    tiny_config.train.update(adapter="none", text_encoder_mode="lora", with_prior_preservation=False, train_step=2)
    result = train(tiny_config, photos, tmp_path / "out")
    meta = json.loads((tmp_path / "out" / META_FILE).read_text())
    assert "uvit_lora" not in meta and "uvit_adapter" not in meta and meta["version"] == 1
    assert {p.name for p in result.files} == {META_FILE, TOKEN_FILE, TEXT_LORA_FILE}
    saved = sum(t.numel() for name in (TOKEN_FILE, TEXT_LORA_FILE)
                for t in load_safetensors(tmp_path / "out" / name).values())
    pipeline = load_pipeline(tiny_config, "cpu", tmp_path / "out", count_parameters=True)
    assert pipeline.finetuned_parameters == result.trainable_parameters == saved == planned_parameters(tiny_config)
