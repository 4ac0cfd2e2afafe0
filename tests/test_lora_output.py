"""`--adapter lora` (the default) writes what a run wrote before the adapter families existed (commit 0e0e06b):
the same files, the same tensors and the same count; personalization.json keeps its format version and
`uvit_lora` entry and differs only in its `recipe` record, which lists the new train keys at their defaults
(the README's "What `--adapter lora` writes")."""
from __future__ import annotations

import json

from libs.adapters.lora import LoraSpec, add_lora, lora_state_dict, uvit_lora_modules
from libs.files import load_safetensors
from libs.models.loading import load_uvit
from libs.train import train
from libs.train_output import META_FILE, REPORT_FILE, RUN_FILE, TOKEN_FILE, UVIT_ADAPTER_FILE, UVIT_LORA_FILE

# personalization.json's keys before the families (a LoRA run of 0e0e06b), and the recipe keys #20 added
BEFORE_KEYS = ["format", "version", "modifier_token", "initializer_token", "num_vectors", "class_word",
               "instance_prompt", "text_encoder_mode", "uvit_lora", "uvit_lora_targets", "base_checkpoint",
               "trainable_parameters", "steps", "trained_steps", "selection", "recipe", "warnings"]
NEW_RECIPE_KEYS = {"adapter": "lora", "ema_decay": 0.0, "lokr_factor": 0, "oft_block_size": 4, "vera_rank": 8,
                   "auto_devices": "", "auto_max_parameters": 0}  # the tiny config's defaults


def test_a_lora_run_writes_the_files_and_count_of_before_the_families(tiny_config, photos, tmp_path, capsys):
    tiny_config.train.update(with_prior_preservation=False, train_step=2, validation_steps=0)
    out = tmp_path / "out"
    result = train(tiny_config, photos, out)
    printed = capsys.readouterr().out

    # the same files (report.html is #22's run page, written by every run)
    assert {p.name for p in out.iterdir() if p.is_file()} == {META_FILE, UVIT_LORA_FILE, TOKEN_FILE, RUN_FILE,
                                                              REPORT_FILE}
    assert not (out / UVIT_ADAPTER_FILE).exists()

    # the same tensors: the names and shapes the pre-family injection (libs.adapters.lora.add_lora) makes
    nnet = load_uvit(tiny_config)
    spec = LoraSpec(r=int(tiny_config.train.rank), alpha=float(tiny_config.train.alpha),
                    dropout=float(tiny_config.train.lora_dropout),
                    target_modules=uvit_lora_modules(nnet, list(tiny_config.train.lora_targets)))
    expected = {name: tuple(t.shape) for name, t in lora_state_dict(add_lora(nnet, spec)).items()}
    saved = load_safetensors(out / UVIT_LORA_FILE)
    assert {name: tuple(t.shape) for name, t in saved.items()} == expected

    # the same count: printed = recorded = the saved tensors' numel = LoRA's formula + the token row
    meta = json.loads((out / META_FILE).read_text())
    token = load_safetensors(out / TOKEN_FILE)
    count = sum(t.numel() for t in saved.values()) + sum(t.numel() for t in token.values())
    assert meta["trainable_parameters"] == result.trainable_parameters == count
    assert count == spec.num_parameters(load_uvit(tiny_config)) + tiny_config.clip_text_dim
    assert f"{count:,} trained parameters" in printed

    # personalization.json: the keys, format version and uvit_lora entry of before; only `recipe` gained keys
    assert list(meta) == BEFORE_KEYS
    assert (meta["format"], meta["version"]) == ("unidiffuser-personalization", 1)
    assert meta["uvit_lora"] == spec.to_dict()
    assert {key: meta["recipe"][key] for key in NEW_RECIPE_KEYS} == NEW_RECIPE_KEYS
