"""U-ViT v1: full-size structure (meta device), numerics against an independent functional reference
written from the checkpoint description, token layout, checkpointing, dtypes, strict loading."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from libs.files import CheckpointError, load_torch_state_dict
from libs.config import load_config
from libs.models.loading import build_uvit, load_uvit

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "uvit_v1.json"


def reference_json() -> dict:
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} not available")
    return json.loads(REFERENCE.read_text())


def test_full_size_structure_matches_official_checkpoint():
    reference = reference_json()
    model = build_uvit(load_config("unidiffuser_v1"), "meta")
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == reference["keys"]
    assert len(shapes) == reference["num_keys"] == 418
    assert sum(p.numel() for p in model.parameters()) == reference["total_params"] == 952_509_520


def functional_uvit(sd: dict, cfg, img, clip_img, text, t_img, t_text, data_type):
    """Independent re-statement of the official forward from ../shared/reference/uvit_v1.json:
    explicit softmax attention, sinusoids cos-first, token order [t_img, t_text, type, text, clip, patches]."""
    D, heads, p = cfg.embed_dim, cfg.num_heads, cfg.patch_size
    B, C, H, W = img.shape

    def linear(x, name):
        return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))

    def layer_norm(x, name):
        return F.layer_norm(x, (D,), sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-5)

    def sinusoid(t):
        half = D // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], -1)

    def block(x, name, skip=None):
        if skip is not None:
            x = layer_norm(linear(torch.cat([x, skip], -1), f"{name}.skip_linear"), f"{name}.norm1")
        qkv = linear(x, f"{name}.attn.qkv").reshape(B, -1, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * (D // heads) ** -0.5).softmax(-1)
        a = (attn @ v).transpose(1, 2).reshape(B, -1, D)
        x = layer_norm(x + linear(a, f"{name}.attn.proj"), f"{name}.norm2")
        hidden = F.gelu(linear(x, f"{name}.mlp.fc1"))
        return layer_norm(x + linear(hidden, f"{name}.mlp.fc2"), f"{name}.norm3")

    patches = F.conv2d(img, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    tokens = torch.cat([
        sinusoid(t_img)[:, None], sinusoid(t_text)[:, None], sd["token_embedding.weight"][data_type.long()][:, None],
        linear(text, "text_embed"), linear(clip_img, "clip_img_embed"), patches,
    ], 1)
    pos = sd["pos_embed"]
    grid = cfg.img_size // p
    pos_patches = pos[:, -grid * grid:]
    if (H // p, W // p) != (grid, grid):
        pos_patches = pos_patches.reshape(1, grid, grid, D).permute(0, 3, 1, 2)
        pos_patches = F.interpolate(pos_patches, (H // p, W // p), mode="bilinear").permute(0, 2, 3, 1).reshape(1, -1, D)
    pos = torch.cat([pos[:, :2], sd["pos_embed_token"], pos[:, 2:-grid * grid], pos_patches], 1)
    x = tokens + pos
    skips = []
    for i in range(cfg.depth // 2):
        x = block(x, f"in_blocks.{i}")
        skips.append(x)
    x = block(x, "mid_block")
    for i in range(cfg.depth // 2):
        x = block(x, f"out_blocks.{i}", skips.pop())
    x = layer_norm(x, "norm")
    n_text = text.shape[1]
    text_out = linear(x[:, 3:3 + n_text], "text_out")
    clip_out = linear(x[:, 3 + n_text:4 + n_text], "clip_img_out")
    img_out = linear(x[:, 4 + n_text:], "decoder_pred")
    img_out = img_out.reshape(B, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)
    return img_out, clip_out, text_out


def inputs(cfg, batch=2, height=None, width=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    height = height or cfg.nnet.img_size
    width = width or cfg.nnet.img_size
    return dict(
        img=torch.randn(batch, 4, height, width, generator=g),
        clip_img=torch.randn(batch, 1, cfg.clip_img_dim, generator=g),
        text=torch.randn(batch, 77, cfg.text_dim, generator=g),
        t_img=torch.rand(batch, generator=g) * 1000,
        t_text=torch.zeros(batch, dtype=torch.int32),
        data_type=torch.ones(batch, dtype=torch.int32),
    )


def randomized_model(cfg):
    """Tiny model with every parameter random (zeros in LayerNorm/bias would hide layout bugs)."""
    torch.manual_seed(1)
    model = build_uvit(cfg).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("attention", ["sdpa", "math"])
@pytest.mark.parametrize("size", [(8, 8), (12, 6)])
def test_matches_functional_reference(tiny_config, size, attention):
    model = randomized_model(tiny_config)
    model.set_attention_mode(attention)
    x = inputs(tiny_config, height=size[0], width=size[1])
    with torch.no_grad():
        ours = model(**x)
        ref = functional_uvit(model.state_dict(), tiny_config.nnet, **x)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        assert (a - b).norm() / b.norm() < 1e-4


def test_token_layout_sensitivity(tiny_config):
    model = randomized_model(tiny_config)
    x = inputs(tiny_config)
    with torch.no_grad():
        base = model(**x)
        other_text = model(**{**x, "text": x["text"] + 1})
        other_type = model(**{**x, "data_type": torch.zeros_like(x["data_type"])})
        other_t_text = model(**{**x, "t_text": torch.full_like(x["t_img"], 1000.0)})
        again = model(**x)
    for a, b in zip(base, again):
        assert torch.equal(a, b)
    for changed in (other_text, other_type, other_t_text):
        assert all(not torch.allclose(a, b) for a, b in zip(base, changed))
    # the batch items are independent: changing item 1 leaves item 0 alone
    x2 = {k: v.clone() for k, v in x.items()}
    x2["text"][1] += 1
    with torch.no_grad():
        partial = model(**x2)
    assert torch.allclose(partial[0][0], base[0][0], atol=1e-6) and not torch.allclose(partial[0][1], base[0][1])


def test_gradient_checkpointing_same_outputs_and_grads(tiny_config):
    model = randomized_model(tiny_config).train()
    x = inputs(tiny_config)

    def run(enabled):
        model.zero_grad()
        model.set_gradient_checkpointing(enabled)
        out = model(**x)
        loss = sum(o.pow(2).mean() for o in out)
        loss.backward()
        return [o.detach() for o in out], {n: p.grad.clone() for n, p in model.named_parameters()}

    out_plain, grads_plain = run(False)
    out_ckpt, grads_ckpt = run(True)
    for a, b in zip(out_plain, out_ckpt):
        assert torch.allclose(a, b, atol=1e-6)
    for name in grads_plain:
        assert torch.allclose(grads_plain[name], grads_ckpt[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward(tiny_config, dtype):
    model = randomized_model(tiny_config)
    x = inputs(tiny_config)
    with torch.no_grad():
        reference = model(**x)
        with torch.autocast("cpu", dtype=dtype):
            autocast_out = model(**x)
        half = model.to(dtype)(**{k: v.to(dtype) if v.is_floating_point() else v for k, v in x.items()})
    for a, b, c in zip(reference, autocast_out, half):
        assert b.dtype == dtype and c.dtype == dtype
        assert torch.isfinite(b).all() and torch.isfinite(c).all()
        assert (b.float() - a).norm() / a.norm() < 0.1


def test_load_roundtrip_through_real_format(tiny_config, tiny_world):
    model = load_uvit(tiny_config)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    on_disk = load_torch_state_dict(tiny_world / "uvit_v1.pth")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in on_disk.items())


def test_load_rejects_missing_and_extra_keys(tiny_config, tiny_world, tmp_path):
    state = load_torch_state_dict(tiny_world / "uvit_v1.pth")
    broken = dict(state)
    del broken["mid_block.attn.qkv.weight"]
    broken["mid_block.attn.qkv.bias"] = torch.zeros(3)
    path = tmp_path / "broken.pth"
    torch.save(broken, path)
    with pytest.raises(CheckpointError) as error:
        load_uvit(tiny_config, path=str(path))
    message = str(error.value)
    assert "mid_block.attn.qkv.weight" in message and "mid_block.attn.qkv.bias" in message and str(path) in message


def test_missing_checkpoint_names_file_and_download_command(tiny_config, tmp_path):
    with pytest.raises(CheckpointError, match=r"(?s)nope\.pth.*python tools/download\.py"):
        load_uvit(tiny_config, path=str(tmp_path / "nope.pth"))


class NotATensor:
    pass


def test_pickles_are_loaded_with_weights_only(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"x": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="evil.pth"):
        load_torch_state_dict(path)
