"""The identity levers of the loss: the person-mask-weighted instance MSE (masks framed exactly as their photos,
on the latent grid, cached with the latents) and min-SNR-gamma weighting, each equal to the plain loss at its
neutral setting."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ml_collections import ConfigDict
from PIL import Image
from torch import nn

from libs.diffusion import alphas_cumprod
from libs.models.loading import load_autoencoder, load_image_encoder
from libs.files import load_safetensors
from libs.photos import CROPS_FILE, PhotoError
from libs.train import Batch, BatchMaker, ImageEncoder, LatentSource, TrainData, load_instance_images, loss_terms
from libs.train.batches import mask_weights, min_snr_weights
from libs.train.encodings import latent_mask
from libs.train.summary import loss_summary
from libs.train.images import square_crop

PERSON = (20, 20, 80, 150)  # x0, y0, x1, y1 of the person in the 120 x 200 photo (off centre: a flip differs)


@pytest.fixture()
def crops(tmp_path) -> Path:
    """A crops folder as tools/crop.py leaves it with background removal: a portrait whose person (red) stands
    on white, its person mask in masks/, crops.json with a face box near the top; and a photo without a mask."""
    folder = tmp_path / "boy1"
    (folder / "masks").mkdir(parents=True)
    photo = Image.new("RGB", (120, 200), "white")
    mask = Image.new("L", (120, 200), 0)
    photo.paste((200, 0, 0), PERSON)
    mask.paste(255, PERSON)
    photo.save(folder / "me.png")
    mask.save(folder / "masks" / "me.png")
    other = Image.new("RGB", (80, 80), (0, 0, 200))
    other.paste((0, 200, 0), (0, 0, 30, 80))
    other.save(folder / "other.png")
    entries = {"IMG_1.jpg": {"output": "me.png", "mask": "masks/me.png", "face_box": [30, 25, 70, 65]},
               "IMG_2.jpg": {"output": "other.png", "mask": None, "face_box": None}}
    (folder / CROPS_FILE).write_text(json.dumps({"settings": {}, "photos": entries}))
    return folder


@pytest.fixture()
def encoder(tiny_config) -> ImageEncoder:
    return ImageEncoder(load_autoencoder(tiny_config), load_image_encoder(tiny_config), "cpu")


def test_a_mask_gets_exactly_its_photos_framing(crops):
    me, other = load_instance_images(crops, 64, crop="face", min_side=32, masks=True)
    assert other.mask is None and me.mask.size == (64, 64) and me.mask.mode == "L"
    person = np.asarray(me.mask) > 127
    red = np.asarray(me.image)[..., 1] < 128
    assert 0.2 < person.mean() < 0.9 and (person == red).mean() > 0.98
    with Image.open(crops / "masks" / "me.png") as raw:
        framed_as_photo = square_crop(raw.convert("L"), 64, (30, 25, 70, 65), Image.BILINEAR)
        assert np.array_equal(np.asarray(me.mask), np.asarray(framed_as_photo))
        assert not np.array_equal(np.asarray(me.mask), np.asarray(square_crop(raw.convert("L"), 64)))  # face-framed
    (plain, _) = load_instance_images(crops, 64, crop="face", min_side=32)
    assert plain.mask is None  # masks are read only for the masked loss


def test_masks_on_the_latent_grid_are_cached_with_the_latents(crops, encoder, tmp_path):
    images = load_instance_images(crops, 64, crop="face", min_side=32, masks=True)
    cache = tmp_path / "cache"
    source = LatentSource(images, hflip=True, encoder=encoder, batch_size=4, cache_dir=cache, cache_key="k")
    views = torch.arange(4)
    masks = source.mask_lookup(views)
    assert masks.shape == (4, 1, 8, 8)
    torch.testing.assert_close(masks[1], masks[0].flip(-1))  # the mirror view's mask is mirrored
    assert torch.equal(masks[0], latent_mask(images[0].mask)) and torch.equal(masks[2:], torch.ones(2, 1, 8, 8))
    assert masks[0].min() == 0 and masks[0].max() == 1
    on_the_spot = LatentSource(images, hflip=True, encoder=encoder, cached=False)
    assert torch.equal(on_the_spot.mask_lookup(views), masks)

    entries = sorted(cache.glob("*.safetensors"))
    assert len(entries) == 4
    assert sum("mask" in load_safetensors(entry) for entry in entries) == 2
    from_disk = LatentSource(images, hflip=True, encoder=encoder, cache_dir=cache, cache_key="k")
    assert torch.equal(from_disk.mask_lookup(views), masks)
    (crops / "masks" / "me.png").unlink()
    Image.new("L", (120, 200), 255).save(crops / "masks" / "me.png")  # another mask, the same pixels
    remasked = load_instance_images(crops, 64, crop="face", min_side=32, masks=True)
    LatentSource(remasked, hflip=True, encoder=encoder, cache_dir=cache, cache_key="k")
    assert len(list(cache.glob("*.safetensors"))) == 6  # the masked views got new keys, the others did not


def test_a_mask_of_another_size_is_refused(crops):
    Image.new("L", (60, 100), 255).save(crops / "masks" / "me.png")
    with pytest.raises(PhotoError, match=r"me\.png is 60x100 but its photo is 120x200.*crop\.py"):
        load_instance_images(crops, 64, crop="face", min_side=32, masks=True)


def batch_config(**settings) -> ConfigDict:
    values = dict(batch_size=2, class_batch_size=0, masked_loss=False, mask_background_weight=0.0, min_snr_gamma=0.0)
    return ConfigDict({**values, **settings})


class Outputs(nn.Module):
    """A stand-in noise predictor whose predictions are its own parameters: the loss's gradient lands on them."""

    def __init__(self, batch: Batch):
        super().__init__()
        self.img = nn.Parameter(torch.randn_like(batch.eps_z))
        self.clip = nn.Parameter(torch.randn_like(batch.eps_clip))

    def forward(self, *inputs):
        return self.img, self.clip


def test_masked_and_min_snr_losses_at_their_neutral_settings_are_the_plain_loss(crops, encoder):
    images = load_instance_images(crops, 64, crop="face", min_side=32, masks=True)
    data = TrainData(LatentSource(images, True, encoder), torch.zeros(1, 77, dtype=torch.long), torch.zeros(1, 77, 8))
    plain = BatchMaker(data, batch_config(), encoder.autoencoder, 0, 0)(1)
    assert plain.instance_weight is None and plain.row_weight is None
    masked = BatchMaker(data, batch_config(masked_loss=True, mask_background_weight=0.25), encoder.autoencoder, 0, 0)(1)
    views = BatchMaker(data, batch_config(), encoder.autoencoder, 0, 0).instance_views(1)
    assert torch.equal(masked.instance_weight, mask_weights(data.instance.mask_lookup(views), 0.25))
    assert torch.equal(masked.z_t, plain.z_t)  # the switch changes the weights, nothing drawn

    model = Outputs(plain)
    reference = {"instance": nn.functional.mse_loss(model.img.float(), plain.eps_z),
                 "clip_img": nn.functional.mse_loss(model.clip.float(), plain.eps_clip)}
    ones = Batch(**{**vars(plain), "instance_weight": torch.ones(2, 1, 8, 8)})
    huge_gamma = Batch(**{**vars(plain), "row_weight": min_snr_weights(plain.timesteps, 1e30)})
    for batch in (plain, ones, huge_gamma):
        terms = loss_terms(model, batch, torch.device("cpu"))
        for name in reference:
            torch.testing.assert_close(terms[name], reference[name], rtol=1e-6, atol=1e-7)


def test_min_snr_weights():
    abar = alphas_cumprod()
    timesteps = torch.tensor([1, 200, 500, 999])
    snr = abar[timesteps] / (1 - abar[timesteps])
    weights = min_snr_weights(timesteps, 5.0)
    torch.testing.assert_close(weights, (snr.clamp(max=5.0) / snr).float())
    assert weights[0] < 0.01 and weights[-1] == 1  # low noise (high SNR) weighs less; high noise counts fully
    assert torch.equal(min_snr_weights(timesteps, 1e30), torch.ones(4))


def test_a_background_of_weight_zero_gets_no_gradient():
    eps = torch.randn(2, 4, 8, 8)
    batch = Batch(torch.zeros(2, 4, 8, 8), torch.zeros(2, 1, 16), torch.tensor([10, 900]), eps, torch.randn(2, 1, 16),
                  None, torch.zeros(2, 77, 8), 2, instance_weight=torch.zeros(2, 1, 8, 8))
    batch.instance_weight[:, :, 2:6, 3:5] = 1.0  # the person's latent cells
    model = Outputs(batch)
    loss_terms(model, batch, torch.device("cpu"))["instance"].backward()
    person = batch.instance_weight.expand_as(eps).bool()
    assert torch.all(model.img.grad[~person] == 0)
    assert torch.all(model.img.grad[person] != 0)


def test_the_run_summary_says_which_photos_the_mask_reaches(crops):
    images = load_instance_images(crops, 64, crop="face", min_side=32, masks=True)
    cfg = batch_config(masked_loss=True, min_snr_gamma=5.0)
    text = loss_summary(cfg, images, crops)
    assert "person-mask-weighted MSE for 1 of 2 photos" in text and "plain MSE for the others" in text
    assert "min-SNR weights, gamma 5.0" in text
    unmasked = [image for image in images if image.mask is None]
    assert "no person masks" in loss_summary(cfg, unmasked, crops)
    assert loss_summary(batch_config(), images, crops) == "plain MSE"
