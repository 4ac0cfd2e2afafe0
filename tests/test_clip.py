"""CLIP towers: real BPE ids, personalization tokens stored beside the vocabulary, OpenAI preprocessing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from libs.models.clip import CLIP_MEAN, CLIP_STD, clip_image_preprocess
from libs.models.loading import load_image_encoder, load_text_encoder, original_text_encoder_state


def test_tokenizer_is_the_real_clip_vocabulary(tiny_config):
    encoder = load_text_encoder(tiny_config)
    # ids of OpenAI's tokenizer for this prompt
    assert encoder.tokenizer("a photo of a boy").input_ids == [49406, 320, 1125, 539, 320, 1876, 49407]
    ids = encoder.tokenize(["a photo of a boy", "word " * 100])
    assert ids.shape == (2, 77)
    assert ids[0, 7:].eq(49407).all()  # padded to max length with the end token
    assert ids[1, -1] == 49407  # truncated, still ends with the end token


def test_text_states_shape_and_prompt_dependence(tiny_config):
    encoder = load_text_encoder(tiny_config)
    states = encoder.encode(["a photo of a boy", "a photo of a girl", ""])
    assert states.shape == (3, 77, tiny_config.clip_text_dim)
    assert not torch.allclose(states[0], states[1])


def test_modifier_token_rows_live_beside_the_vocabulary(tiny_config):
    encoder = load_text_encoder(tiny_config)
    before = encoder.encode(["a photo of a boy"])
    ids = encoder.add_modifier_token("<new1>", "boy")
    assert ids == [49408]
    assert encoder.tokenizer("a <new1> boy").input_ids[2] == 49408
    # the original matrix keeps its shape; the new row starts as the class word's row
    assert encoder.token_embedding.weight.shape[0] == 49408
    boy_id = encoder.tokenizer("boy", add_special_tokens=False).input_ids[0]
    assert torch.equal(encoder.new_token_rows()[0], encoder.token_embedding.weight[boy_id])
    assert torch.equal(encoder.encode(["a photo of a boy"]), before)  # prompts without the token are untouched

    with_token = encoder.encode(["a photo of a <new1> boy"])
    with torch.no_grad():
        encoder.token_embedding.extra_weight.add_(1.0)
    assert not torch.allclose(encoder.encode(["a photo of a <new1> boy"]), with_token)

    # only the new row receives gradient when the tower is frozen
    encoder.token_embedding.extra_weight.requires_grad_(True)
    encoder(["a photo of a <new1> boy"]).sum().backward()
    assert encoder.token_embedding.extra_weight.grad.abs().sum() > 0
    assert encoder.token_embedding.weight.grad is None

    original = original_text_encoder_state(tiny_config)
    assert "embeddings.token_embedding.extra_weight" not in original
    assert set(original) | {"embeddings.token_embedding.extra_weight"} == set(encoder.transformer.state_dict())


def test_multi_vector_token_expands_in_prompts(tiny_config):
    encoder = load_text_encoder(tiny_config)
    encoder.add_modifier_token("<new1>", torch.zeros(tiny_config.clip_text_dim), num_vectors=3)
    assert encoder.expand_prompt("a <new1> boy") == "a <new1> <new1>_1 <new1>_2 boy"
    ids = encoder.tokenize(["a <new1> boy"])[0].tolist()
    assert ids[2:5] == [49408, 49409, 49410]
    assert encoder.new_token_rows().shape == (3, tiny_config.clip_text_dim)


def test_modifier_token_errors(tiny_config):
    encoder = load_text_encoder(tiny_config)
    with pytest.raises(ValueError, match="already exists"):
        encoder.add_modifier_token("boy", "boy")
    encoder.add_modifier_token("<new1>", "boy")
    with pytest.raises(ValueError, match="already added"):
        encoder.add_modifier_token("<new2>", "girl")


def test_openai_preprocessing_resizes_short_side_and_center_crops():
    size = 224
    wide = np.zeros((100, 300, 3), np.uint8)
    wide[:, 150:] = 255  # right half white: the center crop sees both halves equally
    pixels = clip_image_preprocess([Image.fromarray(wide)], size)
    assert pixels.shape == (1, 3, size, size)
    left = pixels[0, 0, :, 10].mean().item()
    right = pixels[0, 0, :, -10].mean().item()
    assert left == pytest.approx((0 - CLIP_MEAN[0]) / CLIP_STD[0], abs=1e-4)
    assert right == pytest.approx((1 - CLIP_MEAN[0]) / CLIP_STD[0], abs=1e-4)
    # a constant image maps to the normalized constant in every channel
    grey = clip_image_preprocess([Image.new("RGB", (50, 80), (128, 64, 32))], size)
    expected = [(v / 255 - m) / s for v, m, s in zip((128, 64, 32), CLIP_MEAN, CLIP_STD)]
    assert torch.allclose(grey[0].mean(dim=(1, 2)), torch.tensor(expected), atol=1e-4)


def test_image_encoder_returns_unnormalized_projection(tiny_config, public_photos):
    encoder = load_image_encoder(tiny_config)
    embeds = encoder.encode_images([public_photos["astronaut"], public_photos["grace_hopper"]])
    assert embeds.shape == (2, tiny_config.clip_img_dim)
    assert not torch.allclose(embeds.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(embeds[0], embeds[1])


@pytest.mark.parametrize("layout", ["text_model", "clip_model", "clip_model_fp16", "bin"])
def test_original_text_encoder_state_is_what_from_pretrained_loads(tiny_config, tmp_path, layout):
    """The §7 reference equals the model transformers loads from the folder: read tensor by tensor for our
    tiny world's CLIPTextModel folder and a full CLIPModel folder (text tower under `text_model.`, as the
    official openai/clip-vit-large-patch14); loaded as a model for an fp16 CLIPModel folder (whose text
    config names no dtype) and a pytorch_model.bin folder."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextModel

    from libs.files import LazySafetensors

    if layout != "text_model":
        tiny = CLIPTextModel.from_pretrained(tiny_config.paths.clip_text)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=32, patch_size=8)
        model = CLIPModel(CLIPConfig(text_config=tiny.config.to_dict(), vision_config=vision, projection_dim=16))
        if layout == "clip_model_fp16":
            model = model.half()
        folder = tmp_path / layout
        model.save_pretrained(folder)
        if layout == "bin":
            torch.save(model.state_dict(), folder / "pytorch_model.bin")
            (folder / "model.safetensors").unlink()
        tiny_config.paths.clip_text = str(folder)
    original = original_text_encoder_state(tiny_config)
    assert isinstance(original, LazySafetensors) == (layout in ("text_model", "clip_model"))
    loaded = CLIPTextModel.from_pretrained(tiny_config.paths.clip_text).state_dict()
    assert set(original) == set(loaded)
    for name, tensor in loaded.items():
        assert original[name].dtype == tensor.dtype and torch.equal(original[name], tensor), name
