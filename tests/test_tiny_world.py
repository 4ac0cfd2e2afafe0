"""The tiny world is written in the official formats and is deterministic; weights download/checks."""
from __future__ import annotations

import json

import pytest
import torch

from ldm_vae_reference import LDMAutoencoderKL
from libs.files import CheckpointError, load_torch_state_dict
from libs.config import load_config
from libs.download import download_weights, ensure_weights, weight_items
from libs.tiny_world import MARKER, build_tiny_world


def test_files_are_in_the_official_layouts(tiny_world):
    names = {p.name for p in tiny_world.iterdir()}
    assert {"uvit_v1.pth", "autoencoder_kl.pth", "caption_decoder.pth", "clip-vit-large-patch14", "clip-vit-base-patch32"} <= names
    uvit = load_torch_state_dict(tiny_world / "uvit_v1.pth")
    assert "pos_embed_token" in uvit and "in_blocks.0.attn.qkv.weight" in uvit
    vae = load_torch_state_dict(tiny_world / "autoencoder_kl.pth")
    with torch.device("meta"):  # the LDM network's own state_dict is the official layout
        ldm_layout = LDMAutoencoderKL(**load_config("tiny").autoencoder.to_dict()).state_dict()
    assert [(k, v.shape) for k, v in vae.items()] == [(k, v.shape) for k, v in ldm_layout.items()]
    for folder in ("clip-vit-large-patch14", "clip-vit-base-patch32"):
        config = json.loads((tiny_world / folder / "config.json").read_text())
        assert config["model_type"] == "clip"  # a full CLIPModel folder, as on the hub
        assert (tiny_world / folder / "tokenizer_config.json").is_file()


def test_generation_is_deterministic_and_skips_when_up_to_date(tiny_world, tmp_path):
    again = build_tiny_world("tiny", tmp_path / "models")
    for name in ("uvit_v1.pth", "autoencoder_kl.pth", "caption_decoder.pth"):
        a, b = load_torch_state_dict(tiny_world / name), load_torch_state_dict(again / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    stamp = (again / "uvit_v1.pth").stat().st_mtime_ns
    build_tiny_world("tiny", again)
    assert (again / "uvit_v1.pth").stat().st_mtime_ns == stamp
    assert (again / MARKER).is_file()


def test_ensure_weights_lists_every_missing_file(tmp_path):
    config = load_config("tiny")
    config.paths.nnet = str(tmp_path / "a.pth")
    config.paths.autoencoder = str(tmp_path / "b.pth")
    with pytest.raises(CheckpointError) as error:
        ensure_weights(config, ["nnet", "autoencoder"])
    assert "a.pth" in str(error.value) and "b.pth" in str(error.value) and "python tools/download.py" in str(error.value)


def test_download_fetches_only_missing_items(tiny_config, tmp_path):
    tiny_config.paths.nnet = str(tmp_path / "models" / "uvit_v1.pth")
    tiny_config.paths.clip_img_hub = "openai/clip-vit-base-patch32"
    tiny_config.paths.clip_img = str(tmp_path / "models" / "clip-vit-base-patch32")
    calls = []

    def fake_file(item):
        calls.append((item.repo_id, item.filename))
        item.path.parent.mkdir(parents=True, exist_ok=True)
        item.path.write_bytes(b"x")

    def fake_folder(item):
        calls.append((item.repo_id, None))
        item.path.mkdir(parents=True)
        (item.path / "config.json").write_text("{}")

    log = []
    fetched = download_weights(tiny_config, fetch_file=fake_file, fetch_folder=fake_folder, log=log.append)
    assert calls == [("thu-ml/unidiffuser-v1", "uvit_v1.pth"), ("openai/clip-vit-base-patch32", None)]
    assert [i.key for i in fetched] == ["nnet", "clip_img"]
    assert sum(line.startswith("present") for line in log) == 3
    assert download_weights(tiny_config, fetch_file=fake_file, fetch_folder=fake_folder, log=log.append) == []


def test_download_refuses_items_without_a_source(tmp_path):
    config = load_config("tiny")  # the tiny config names no hub ids
    config.paths.clip_text = str(tmp_path / "none")
    with pytest.raises(CheckpointError, match="names no hub repository"):
        download_weights(config, only=["clip_text"], log=lambda _: None)
    assert {i.key for i in weight_items(config)} == {"nnet", "autoencoder", "caption_decoder", "clip_text", "clip_img"}


def test_atomic_writes_get_normal_permissions(tmp_path):
    import os
    import stat

    from libs.files import save_json

    save_json({"a": 1}, tmp_path / "x.json")
    mode = stat.S_IMODE((tmp_path / "x.json").stat().st_mode)
    mask = os.umask(0)
    os.umask(mask)
    assert mode == 0o666 & ~mask
