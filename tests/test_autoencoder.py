"""The KL autoencoder: official key layout, strict file round trip, numerical identity with the
diffusers port of the LDM VAE, sampling semantics, sliced decoding and bf16."""
from __future__ import annotations

import json
from pathlib import Path

import ml_collections
import pytest
import torch

from libs.models.autoencoder import AutoencoderKL
from libs.models.loading import load_autoencoder
from libs.checkpoint import CheckpointError
from libs.config import load_config

REPO = Path(__file__).resolve().parents[1]
# the reference key list lives outside the repository (../shared, or shared/ in some checkouts)
REFERENCES = [root / "shared" / "reference" / "autoencoder_kl.json" for root in (REPO.parent, REPO)]
# the LDM `ddconfig` part of config.autoencoder (the rest is embed_dim and scale_factor)
DDCONFIG_KEYS = (
    "double_z",
    "z_channels",
    "resolution",
    "in_channels",
    "out_ch",
    "ch",
    "ch_mult",
    "num_res_blocks",
    "attn_resolutions",
    "dropout",
)
TINY_PIXELS = 32  # 4 levels -> 4x4 latents
# the tiny config never changes width, so this variant exercises the nin_shortcut projections too
WIDENING = {"ch_mult": (1, 2, 2, 1)}


def _tiny_args(**overrides: object) -> dict:
    return {**load_config("tiny").autoencoder.to_dict(), **overrides}


def _tiny_model(seed: int = 0, **overrides: object) -> AutoencoderKL:
    """A tiny VAE whose norm affines and biases are randomised too, so a wrong norm/bias path shows."""
    torch.manual_seed(seed)
    model = AutoencoderKL(**_tiny_args(**overrides)).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.3 * torch.randn_like(param))
    return model


def _pixels(batch: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, TINY_PIXELS, TINY_PIXELS, generator=generator) * 2 - 1


def _latents(batch: int, seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, TINY_PIXELS // 8, TINY_PIXELS // 8, generator=generator)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[AutoencoderKL, Path]:
    model = _tiny_model()
    path = tmp_path_factory.mktemp("vae") / "autoencoder_kl.pth"
    torch.save(model.state_dict(), path)
    return model, path


def _config_for(path: Path) -> ml_collections.ConfigDict:
    config = load_config("tiny")
    config.paths.autoencoder = str(path)
    return config


# --- (1) full-size structure ------------------------------------------------------------------


def _full_size_meta_model() -> AutoencoderKL:
    with torch.device("meta"):
        return AutoencoderKL(**load_config("unidiffuser_v1").autoencoder.to_dict())


def test_full_size_counts_and_landmark_keys() -> None:
    """Holds without the reference file: the official totals and a few keys that pin the layout."""
    model = _full_size_meta_model()
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert len(shapes) == 248
    assert sum(p.numel() for p in model.parameters()) == 83_653_863
    assert shapes["encoder.down.1.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
    assert shapes["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes["decoder.up.0.block.2.conv2.weight"] == (128, 128, 3, 3)
    assert shapes["decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in shapes
    assert "encoder.down.3.downsample.conv.weight" not in shapes
    assert shapes["quant_conv.weight"] == (8, 8, 1, 1)
    assert shapes["post_quant_conv.weight"] == (4, 4, 1, 1)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 and m.eps == 1e-6 for m in norms)  # too small for the diffusers check


def test_full_size_state_dict_matches_official_layout() -> None:
    found = [path for path in REFERENCES if path.is_file()]
    if not found:
        pytest.skip(f"reference key list not found at {REFERENCES[0]}")
    reference = json.loads(found[0].read_text())
    config = load_config("unidiffuser_v1")
    model = _full_size_meta_model()
    shapes = {name: list(t.shape) for name, t in model.state_dict().items()}
    assert shapes == reference["keys"]
    assert list(shapes) == list(reference["keys"])  # same registration order as LDM, too
    assert len(shapes) == reference["num_keys"] == 248
    assert sum(p.numel() for p in model.parameters()) == reference["total_params"] == 83_653_863
    assert {k: config.autoencoder[k] for k in DDCONFIG_KEYS} == {
        k: tuple(v) if isinstance(v, list) else v for k, v in reference["ddconfig"].items()
    }
    assert config.autoencoder.scale_factor == reference["scale_factor"]


def test_unsupported_configs_are_rejected() -> None:
    args = _tiny_args()
    with pytest.raises(ValueError, match="attn_resolutions"):
        AutoencoderKL(**{**args, "attn_resolutions": (8,)})
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKL(**{**args, "double_z": False})


# --- (2) file round trip and strict loading ---------------------------------------------------


def test_saved_state_dict_loads_strictly_and_reproduces_outputs(tiny_file: tuple[AutoencoderKL, Path]) -> None:
    model, path = tiny_file
    loaded = load_autoencoder(_config_for(path))
    assert not loaded.training
    assert all(not p.requires_grad and not p.is_meta and p.dtype == torch.float32 for p in loaded.parameters())
    x, z = _pixels(2), _latents(2)
    with torch.no_grad():
        assert torch.equal(loaded.encode_moments(x), model.encode_moments(x))
        assert torch.equal(loaded.decode(z), model.decode(z))


@pytest.mark.parametrize(
    "edit, key",
    [
        ("drop", "decoder.up.1.upsample.conv.weight"),
        ("drop", "encoder.mid.attn_1.q.bias"),
        ("add", "encoder.down.0.attn.0.q.weight"),
    ],
)
def test_key_mismatch_fails_naming_the_key(tmp_path: Path, edit: str, key: str) -> None:
    state = _tiny_model().state_dict()
    if edit == "drop":
        del state[key]
    else:
        state[key] = torch.zeros(32, 32, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_autoencoder(_config_for(path))


def test_shape_mismatch_fails(tmp_path: Path) -> None:
    state = _tiny_model().state_dict()
    state["quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"quant_conv\.weight"):
        load_autoencoder(_config_for(path))


def test_missing_file_names_file_and_download_command(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "autoencoder_kl.pth"
    with pytest.raises(CheckpointError) as info:
        load_autoencoder(_config_for(path))
    assert str(path) in str(info.value)
    assert "python tools/download.py" in str(info.value)


# --- (3) numerical identity with diffusers' LDM VAE -------------------------------------------


@pytest.mark.parametrize("overrides", [{}, WIDENING], ids=["tiny", "widening"])
def test_matches_diffusers_ldm_vae(overrides: dict) -> None:
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import (
        convert_ldm_vae_checkpoint,
        create_vae_diffusers_config_from_ldm,
    )

    model = _tiny_model(**overrides)
    args = _tiny_args(**overrides)
    ldm_config = {
        "model": {
            "params": {
                "scale_factor": args["scale_factor"],
                "first_stage_config": {"params": {"ddconfig": {k: args[k] for k in DDCONFIG_KEYS}}},
            }
        }
    }
    state = model.state_dict()
    reference_config = create_vae_diffusers_config_from_ldm(ldm_config, state)
    reference = diffusers.AutoencoderKL(**reference_config).eval()
    reference.load_state_dict(convert_ldm_vae_checkpoint(state, reference_config), strict=True)

    x, z = _pixels(2), _latents(2)
    with torch.no_grad():
        ours_moments = model.encode_moments(x)
        posterior = reference.encode(x).latent_dist
        assert _rel_err(ours_moments, posterior.parameters) <= 1e-4

        ours_z = model.encode(x, generator=torch.Generator().manual_seed(7))
        reference_z = posterior.sample(generator=torch.Generator().manual_seed(7)) * reference_config["scaling_factor"]
        assert _rel_err(ours_z, reference_z) <= 1e-4

        reference_x = reference.decode(z / reference_config["scaling_factor"]).sample
        assert _rel_err(model.decode(z), reference_x) <= 1e-4
        assert model.decode(z).shape == (2, 3, TINY_PIXELS, TINY_PIXELS)


# --- (4) sampling semantics, reproducibility, sliced decoding ---------------------------------


def test_sample_is_scaled_clamped_gaussian() -> None:
    model = _tiny_model()
    mean = torch.randn(2, 4, 3, 3)
    logvar = torch.full_like(mean, 100.0)  # clamped to 20 -> std = e**10
    logvar[:, :, 0] = -100.0  # clamped to -30
    moments = torch.cat([mean, logvar], dim=1)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    expected = (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise) * 0.18215
    got = model.sample(moments, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, expected)


def test_encode_with_seeded_generator_is_reproducible() -> None:
    model = _tiny_model()
    x = _pixels(2)
    with torch.no_grad():
        first = model.encode(x, generator=torch.Generator().manual_seed(11))
        again = model.encode(x, generator=torch.Generator().manual_seed(11))
        other = model.encode(x, generator=torch.Generator().manual_seed(12))
    assert first.shape == (2, 4, TINY_PIXELS // 8, TINY_PIXELS // 8)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("slice_size", [1, 2, 3, 8])
def test_sliced_decode_equals_full_decode(slice_size: int) -> None:
    model = _tiny_model()
    z = _latents(3)
    with torch.no_grad():
        sliced, full = model.decode(z, slice_size=slice_size), model.decode(z)
    assert sliced.shape == full.shape
    assert _rel_err(sliced, full) <= 1e-5  # CPU conv kernels round slightly differently per batch size


def test_slice_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="slice_size"):
        _tiny_model().decode(_latents(1), slice_size=0)


# --- (5) bf16 -----------------------------------------------------------------------------------


def test_bf16_forward(tiny_file: tuple[AutoencoderKL, Path]) -> None:
    model, path = tiny_file
    half = load_autoencoder(_config_for(path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    x, z = _pixels(2), _latents(2)
    with torch.no_grad():
        moments = half.encode_moments(x.bfloat16())
        latents = half.encode(x.bfloat16(), generator=torch.Generator().manual_seed(0))
        pixels = half.decode(z.bfloat16(), slice_size=1)
        assert moments.dtype == latents.dtype == pixels.dtype == torch.bfloat16
        assert torch.isfinite(latents).all() and torch.isfinite(pixels).all()
        assert _rel_err(moments, model.encode_moments(x)) < 0.1
        assert _rel_err(pixels, model.decode(z)) < 0.1
