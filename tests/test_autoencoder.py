"""The KL autoencoder: diffusers' AutoencoderKL read from and written to the official LDM file layout,
strictly; numerical identity with the official LDM network (tests/ldm_vae_reference.py, the oracle) on
the same LDM-layout weights; sampling semantics, sliced decoding, bf16 and the spec §7 count."""
from __future__ import annotations

import json
from pathlib import Path

import ml_collections
import pytest
import torch

import libs.models.loading as loading
from ldm_vae_reference import LDMAutoencoderKL
from libs.files import CheckpointError
from libs.config import load_config
from libs.models.autoencoder import AutoencoderKL
from libs.models.loading import (autoencoder_ldm_state, autoencoder_state_from_ldm, build_autoencoder,
                                 load_autoencoder, original_autoencoder_state)
from libs.adapters.param_count import count_changed_parameters

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
VARIANTS = pytest.mark.parametrize("overrides", [{}, WIDENING], ids=["tiny", "widening"])


def _tiny_config(path: Path | None = None, **overrides: object) -> ml_collections.ConfigDict:
    config = load_config("tiny")
    config.autoencoder.update(overrides)
    if path is not None:
        config.paths.autoencoder = str(path)
    return config


def _randomize_vectors(model: torch.nn.Module, seed: int) -> None:
    """Norm affines and biases randomised too (they start at 1/0), so a wrong norm/bias path shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.3 * torch.randn_like(param))


def _oracle(seed: int = 0, **overrides: object) -> LDMAutoencoderKL:
    """The official LDM network with random weights; its state_dict is an `autoencoder_kl.pth`."""
    torch.manual_seed(seed)
    model = LDMAutoencoderKL(**_tiny_config(**overrides).autoencoder.to_dict()).eval()
    _randomize_vectors(model, seed + 100)
    return model


def _ours(seed: int = 0, **overrides: object) -> AutoencoderKL:
    torch.manual_seed(seed)
    model = build_autoencoder(_tiny_config(**overrides)).eval()
    _randomize_vectors(model, seed + 100)
    return model


def _pixels(batch: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, TINY_PIXELS, TINY_PIXELS, generator=generator) * 2 - 1


def _latents(batch: int, seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, TINY_PIXELS // 8, TINY_PIXELS // 8, generator=generator)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _ldm_file(tmp_path: Path, seed: int = 0, **overrides: object) -> tuple[LDMAutoencoderKL, Path]:
    oracle = _oracle(seed, **overrides)
    path = tmp_path / "autoencoder_kl.pth"
    torch.save(oracle.state_dict(), path)
    return oracle, path


@pytest.fixture(scope="module")
def ldm_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[LDMAutoencoderKL, Path]:
    """A tiny `autoencoder_kl.pth` in the official layout, written by the LDM network itself."""
    return _ldm_file(tmp_path_factory.mktemp("vae"))


# --- (1) full-size structure ------------------------------------------------------------------


def _full_size_meta_model() -> AutoencoderKL:
    return build_autoencoder(load_config("unidiffuser_v1"), "meta")


def test_full_size_counts_and_landmark_keys() -> None:
    """Holds without the reference file: the official totals and a few keys that pin the file layout."""
    model = _full_size_meta_model()
    assert sum(p.numel() for p in model.parameters()) == 83_653_863
    shapes = {name: tuple(t.shape) for name, t in autoencoder_ldm_state(model).items()}
    assert len(shapes) == 248
    assert shapes["encoder.down.1.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
    assert shapes["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes["decoder.mid.attn_1.proj_out.weight"] == (512, 512, 1, 1)
    assert shapes["decoder.up.0.block.2.conv2.weight"] == (128, 128, 3, 3)
    assert shapes["decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in shapes
    assert "encoder.down.3.downsample.conv.weight" not in shapes
    assert shapes["quant_conv.weight"] == (8, 8, 1, 1)
    assert shapes["post_quant_conv.weight"] == (4, 4, 1, 1)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 and m.eps == 1e-6 for m in norms)


def test_full_size_file_layout_matches_official_reference() -> None:
    """What the writer produces and what the loader accepts is exactly the official key list and shapes."""
    found = [path for path in REFERENCES if path.is_file()]
    if not found:
        pytest.skip(f"reference key list not found at {REFERENCES[0]}")
    reference = json.loads(found[0].read_text())
    config = load_config("unidiffuser_v1")
    model = _full_size_meta_model()

    written = {name: list(t.shape) for name, t in autoencoder_ldm_state(model).items()}
    assert list(written.items()) == list(reference["keys"].items())  # names, shapes and LDM's order
    assert len(written) == reference["num_keys"] == 248

    official_file = {name: torch.empty(shape, device="meta") for name, shape in reference["keys"].items()}
    converted = autoencoder_state_from_ldm(model, official_file, "autoencoder_kl.json")
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in model.vae.state_dict().items()}
    assert sum(v.numel() for v in converted.values()) == reference["total_params"] == 83_653_863

    assert {k: config.autoencoder[k] for k in DDCONFIG_KEYS} == {
        k: tuple(v) if isinstance(v, list) else v for k, v in reference["ddconfig"].items()
    }
    assert config.autoencoder.embed_dim == reference["embed_dim"]
    assert config.autoencoder.scale_factor == reference["scale_factor"]


@pytest.mark.parametrize("override, message", [
    ({"attn_resolutions": (8,)}, "attn_resolutions"),
    ({"double_z": False}, "double_z"),
    ({"embed_dim": 8}, "embed_dim"),
    ({"dropout": 0.1}, "dropout"),
])
def test_unsupported_configs_are_rejected(override: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_autoencoder(_tiny_config(**override), "meta")


# --- (2) the official layout: strict loading, identity with the LDM network -------------------


@VARIANTS
def test_official_layout_loads_and_matches_the_ldm_network(tmp_path: Path, overrides: dict) -> None:
    oracle, path = _ldm_file(tmp_path, **overrides)
    loaded = load_autoencoder(_tiny_config(path, **overrides))
    assert not loaded.training
    assert all(not p.requires_grad and not p.is_meta and p.dtype == torch.float32 for p in loaded.parameters())
    x, z = _pixels(2), _latents(2)
    with torch.no_grad():
        assert _rel_err(loaded.encode_moments(x), oracle.encode_moments(x)) <= 1e-5
        assert _rel_err(loaded.decode(z), oracle.decode(z)) <= 1e-5
        seeded = [model.encode(x, generator=torch.Generator().manual_seed(7)) for model in (loaded, oracle)]
        assert _rel_err(*seeded) <= 1e-5
        assert loaded.decode(z).shape == (2, 3, TINY_PIXELS, TINY_PIXELS)

        # in float64 the rounding noise is gone: the same network, not merely a close one
        loaded, oracle = load_autoencoder(_tiny_config(path, **overrides), dtype=torch.float64), oracle.double()
        assert _rel_err(loaded.encode_moments(x.double()), oracle.encode_moments(x.double())) <= 1e-12
        assert _rel_err(loaded.decode(z.double()), oracle.decode(z.double())) <= 1e-12


def test_loaded_official_file_writes_back_identically(ldm_file: tuple[LDMAutoencoderKL, Path]) -> None:
    oracle, path = ldm_file
    written = autoencoder_ldm_state(load_autoencoder(_tiny_config(path)))
    official = oracle.state_dict()
    assert list(written) == list(official)
    assert all(torch.equal(written[k], official[k]) for k in official)


@VARIANTS
def test_written_file_round_trips_exactly(tmp_path: Path, overrides: dict) -> None:
    """diffusers model -> LDM file -> loader: identical tensors and outputs, and the file is the LDM layout."""
    model = _ours(**overrides)
    path = tmp_path / "autoencoder_kl.pth"
    torch.save(autoencoder_ldm_state(model), path)
    file_state = torch.load(path, weights_only=True)
    official_layout = LDMAutoencoderKL(**_tiny_config(**overrides).autoencoder.to_dict()).state_dict()
    assert [(k, v.shape) for k, v in file_state.items()] == [(k, v.shape) for k, v in official_layout.items()]

    loaded = load_autoencoder(_tiny_config(path, **overrides))
    original = model.state_dict()
    assert list(loaded.state_dict()) == list(original)
    assert all(torch.equal(t, original[k]) for k, t in loaded.state_dict().items())
    x, z = _pixels(2), _latents(2)
    with torch.no_grad():
        assert torch.equal(loaded.encode_moments(x), model.encode_moments(x))
        assert torch.equal(loaded.decode(z), model.decode(z))


@pytest.mark.parametrize(
    "edit, key",
    [
        ("drop", "decoder.up.1.upsample.conv.weight"),
        ("drop", "encoder.down.0.downsample.conv.weight"),  # diffusers' conversion would keep the bias alone
        ("drop", "encoder.mid.attn_1.q.bias"),
        ("add", "encoder.down.0.attn.0.q.weight"),
    ],
)
def test_key_mismatch_fails_naming_file_and_key(tmp_path: Path, edit: str, key: str) -> None:
    state = _oracle().state_dict()
    if edit == "drop":
        del state[key]
    else:
        state[key] = torch.zeros(32, 32, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")) as info:
        load_autoencoder(_tiny_config(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("key, shape", [("quant_conv.weight", (8, 8, 3, 3)),
                                        ("decoder.mid.attn_1.k.weight", (32, 32))])  # Linear-shaped, not LDM's conv
def test_shape_mismatch_fails(tmp_path: Path, key: str, shape: tuple[int, ...]) -> None:
    state = _oracle().state_dict()
    state[key] = torch.zeros(shape)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_autoencoder(_tiny_config(path))


def test_keys_the_conversion_skips_are_an_error(ldm_file: tuple[LDMAutoencoderKL, Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A diffusers conversion that silently drops a key (as it does for keys it does not know) must fail
    the load, naming the file and the unused key, never leave a weight uninitialised."""
    _, path = ldm_file
    convert = loading.convert_ldm_vae_checkpoint

    def dropping(state: dict, config: dict) -> dict:
        converted = convert(state, config)
        del converted["decoder.up_blocks.0.resnets.1.conv2.bias"]
        return converted

    monkeypatch.setattr(loading, "convert_ldm_vae_checkpoint", dropping)
    with pytest.raises(CheckpointError) as info:
        load_autoencoder(_tiny_config(path))
    assert str(path) in str(info.value)
    assert "decoder.up.3.block.1.conv2.bias" in str(info.value)  # named as in the file


def test_missing_file_names_file_and_download_command(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "autoencoder_kl.pth"
    with pytest.raises(CheckpointError) as info:
        load_autoencoder(_tiny_config(path))
    assert str(path) in str(info.value)
    assert "python tools/download.py" in str(info.value)


# --- (3) sampling semantics, reproducibility, sliced decoding ---------------------------------


def test_sample_is_scaled_clamped_gaussian() -> None:
    model = _ours()
    mean = torch.randn(2, 4, 3, 3)
    logvar = torch.full_like(mean, 100.0)  # clamped to 20 -> std = e**10
    logvar[:, :, 0] = -100.0  # clamped to -30
    moments = torch.cat([mean, logvar], dim=1)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    expected = (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise) * 0.18215
    got = model.sample(moments, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, expected)


def test_encode_with_seeded_generator_is_reproducible() -> None:
    model = _ours()
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
    model = _ours()
    z = _latents(3)
    with torch.no_grad():
        sliced, full = model.decode(z, slice_size=slice_size), model.decode(z)
    assert sliced.shape == full.shape
    assert _rel_err(sliced, full) <= 1e-5  # CPU conv kernels round slightly differently per batch size


def test_slice_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="slice_size"):
        _ours().decode(_latents(1), slice_size=0)


# --- (4) bf16 -----------------------------------------------------------------------------------


def test_bf16_forward(ldm_file: tuple[LDMAutoencoderKL, Path]) -> None:
    oracle, path = ldm_file
    half = load_autoencoder(_tiny_config(path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    x, z = _pixels(2), _latents(2)
    with torch.no_grad():
        moments = half.encode_moments(x.bfloat16())
        latents = half.encode(x.bfloat16(), generator=torch.Generator().manual_seed(0))
        pixels = half.decode(z.bfloat16(), slice_size=1)
        assert moments.dtype == latents.dtype == pixels.dtype == torch.bfloat16
        assert torch.isfinite(latents).all() and torch.isfinite(pixels).all()
        assert _rel_err(moments, oracle.encode_moments(x)) < 0.1
        assert _rel_err(pixels, oracle.decode(z)) < 0.1


# --- (5) spec §7: the VAE's share of the changed-parameter count ---------------------------------


def test_untouched_autoencoder_counts_no_changed_parameters(ldm_file: tuple[LDMAutoencoderKL, Path]) -> None:
    _, path = ldm_file
    config = _tiny_config(path)
    model = load_autoencoder(config)
    original = original_autoencoder_state(config)
    assert set(original) == {name for name, _ in model.named_parameters()}
    assert count_changed_parameters(model.named_parameters(), original) == 0

    with torch.no_grad():
        model.vae.decoder.conv_out.bias.add_(1.0)
    assert count_changed_parameters(model.named_parameters(), original) == model.vae.decoder.conv_out.bias.numel()
