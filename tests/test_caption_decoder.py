"""Caption decoder prefix layers: official shapes, `module.` prefix, legacy GPT-2 buffers tolerated."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from libs.models.caption_decoder import CaptionDecoderPrefix
from libs.models.loading import load_caption_decoder
from libs.files import CheckpointError, load_torch_state_dict
from libs.config import load_config

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "caption_decoder.json"


def test_full_size_prefix_layers_match_official_checkpoint():
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} not available")
    reference = json.loads(REFERENCE.read_text())["keys"]
    with torch.device("meta"):
        model = CaptionDecoderPrefix(**load_config("unidiffuser_v1").caption_decoder)
    for name, tensor in model.state_dict().items():
        assert list(tensor.shape) == reference[f"module.{name}"], name


def test_loads_prefix_from_full_checkpoint_with_legacy_buffers(tiny_config, tiny_world):
    state = load_torch_state_dict(tiny_world / "caption_decoder.pth")
    assert any(k.endswith("attn.masked_bias") for k in state) and all(k.startswith("module.") for k in state)
    model = load_caption_decoder(tiny_config)
    assert torch.equal(model.encode_prefix.weight, state["module.encode_prefix.weight"])
    out = model(torch.randn(2, 77, tiny_config.clip_text_dim))
    assert out.shape == (2, 77, tiny_config.text_dim)
    assert not any(p.requires_grad for p in model.parameters())


def test_rejects_file_without_prefix_layers(tiny_config, tiny_world, tmp_path):
    state = load_torch_state_dict(tiny_world / "caption_decoder.pth")
    del state["module.encode_prefix.bias"]
    tiny_config.paths.caption_decoder = str(tmp_path / "cd.pth")
    torch.save(state, tiny_config.paths.caption_decoder)
    with pytest.raises(CheckpointError, match=r"module\.encode_prefix\.bias"):
        load_caption_decoder(tiny_config)


def test_rejects_prefix_of_other_size(tiny_config):
    tiny_config.caption_decoder.hidden_dim = 5
    with pytest.raises(CheckpointError, match="do not match the config"):
        load_caption_decoder(tiny_config)
