"""The text-to-image loop (libs/sample/pipeline.py) on the tiny world: batched guidance, the two unconditional
modes, reproducible noise, prompt rewriting and the pipeline loader."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer
from PIL import Image

from libs.config import latent_shape
from libs.diffusion import keyed_generator as sample_generator
from libs.dpm_solver import dpm_solver_sample
from libs.adapters.lora import LoraSpec, add_lora, merge_lora, uvit_lora_modules
from libs.models.loading import load_text_encoder, load_uvit
from libs.personalization import save_personalization
from libs.precision import place_for_inference
from libs.prompts import PromptFileError as SamplingInputError
from libs.prompts import load_prompts, rewrite_prompt
from libs.sample.pipeline import (combine_joint, generate_images, load_pipeline, split_joint, t2i_sample,
                           weight_sharing_copy)

STEPS = 4
BATCH = 2


@pytest.fixture()
def nnet(tiny_config):
    return load_uvit(tiny_config)


@pytest.fixture()
def inputs(tiny_config):
    g = torch.Generator().manual_seed(0)
    text = torch.randn(BATCH, 77, tiny_config.text_dim, generator=g)
    z = torch.randn(BATCH, *latent_shape(tiny_config), generator=g)
    clip_img = torch.randn(BATCH, 1, tiny_config.clip_img_dim, generator=g)
    empty = torch.randn(77, tiny_config.text_dim, generator=g)
    return text, z, clip_img, empty


def seeded_noise(seed: int = 1):
    """A reproducible `true_uncond` text noise: the same sequence of draws on every run."""
    g = torch.Generator().manual_seed(seed)
    return lambda text: torch.randn(text.shape, generator=g)


def count_forwards(nnet):
    calls = []
    handle = nnet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    return calls, handle


def test_joint_state_round_trip(inputs, tiny_config):
    _, z, clip_img, _ = inputs
    x = combine_joint(z, clip_img)
    assert x.shape == (BATCH, z[0].numel() + tiny_config.clip_img_dim)
    z2, clip2 = split_joint(x, latent_shape(tiny_config), tiny_config.clip_img_dim)
    assert torch.equal(z2, z) and torch.equal(clip2, clip_img)


@pytest.mark.parametrize("cfg_mode", ["true_uncond", "empty_token"])
def test_cond_and_uncond_share_one_forward_per_step(nnet, inputs, cfg_mode):
    text, z, clip_img, empty = inputs
    calls, handle = count_forwards(nnet)
    try:
        t2i_sample(nnet, text, z, clip_img, STEPS, 7.0, cfg_mode, empty_text=empty, text_noise_fn=seeded_noise())
    finally:
        handle.remove()
    assert calls == [2 * BATCH] * STEPS


def test_scale_zero_is_the_plain_conditional_model(nnet, inputs):
    text, z, clip_img, _ = inputs
    calls, handle = count_forwards(nnet)
    try:
        z_out, clip_out = t2i_sample(nnet, text, z, clip_img, STEPS, 0.0, "true_uncond")
    finally:
        handle.remove()
    assert calls == [BATCH] * STEPS

    def conditional(x, t_net):
        zz, cc = split_joint(x, z.shape[1:], clip_img.shape[-1])
        zero = torch.zeros_like(t_net)
        zo, co, _ = nnet(zz, cc, text, t_net, zero, torch.ones_like(t_net, dtype=torch.long))
        return combine_joint(zo, co)

    expected = dpm_solver_sample(conditional, combine_joint(z, clip_img), STEPS)
    assert torch.allclose(combine_joint(z_out, clip_out), expected, atol=1e-5)


@pytest.mark.parametrize("cfg_mode", ["true_uncond", "empty_token"])
def test_guidance_matches_two_separate_passes(nnet, inputs, cfg_mode):
    """cond + s(cond - uncond), cond at t_text=0, uncond at t_text=1000 (noise) or 0 (empty prompt)."""
    text, z, clip_img, empty = inputs
    scale = 3.0
    z_out, clip_out = t2i_sample(nnet, text, z, clip_img, STEPS, scale, cfg_mode, empty_text=empty,
                                 text_noise_fn=seeded_noise())
    noise = seeded_noise()
    types = torch.ones(BATCH, dtype=torch.long)

    def guided(x, t_net):
        zz, cc = split_joint(x, z.shape[1:], clip_img.shape[-1])
        zero = torch.zeros_like(t_net)
        cond = combine_joint(*nnet(zz, cc, text, t_net, zero, types)[:2])
        if cfg_mode == "true_uncond":
            uncond = combine_joint(*nnet(zz, cc, noise(text), t_net, torch.full_like(t_net, 1000.0), types)[:2])
        else:
            uncond = combine_joint(*nnet(zz, cc, empty.expand_as(text), t_net, zero, types)[:2])
        return cond + scale * (cond - uncond)

    expected = dpm_solver_sample(guided, combine_joint(z, clip_img), STEPS)
    assert torch.allclose(combine_joint(z_out, clip_out), expected, atol=1e-4)


def test_empty_token_and_true_uncond_differ(nnet, inputs):
    text, z, clip_img, empty = inputs
    a, _ = t2i_sample(nnet, text, z, clip_img, STEPS, 7.0, "true_uncond", text_noise_fn=seeded_noise())
    b, _ = t2i_sample(nnet, text, z, clip_img, STEPS, 7.0, "empty_token", empty_text=empty)
    assert (a - b).abs().max() > 1e-3


def test_true_uncond_is_reproducible_only_through_its_noise(nnet, inputs):
    text, z, clip_img, _ = inputs
    a, _ = t2i_sample(nnet, text, z, clip_img, STEPS, 7.0, "true_uncond", text_noise_fn=seeded_noise(1))
    b, _ = t2i_sample(nnet, text, z, clip_img, STEPS, 7.0, "true_uncond", text_noise_fn=seeded_noise(1))
    c, _ = t2i_sample(nnet, text, z, clip_img, STEPS, 7.0, "true_uncond", text_noise_fn=seeded_noise(2))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-4


def test_bad_sampler_arguments(nnet, inputs):
    text, z, clip_img, _ = inputs
    with pytest.raises(ValueError, match="cfg_mode"):
        t2i_sample(nnet, text, z, clip_img, STEPS, 7.0, "nope")
    with pytest.raises(ValueError, match="empty_text"):
        t2i_sample(nnet, text, z, clip_img, STEPS, 7.0, "empty_token")
    with pytest.raises(ValueError, match="batch sizes"):
        t2i_sample(nnet, text[:1], z, clip_img, STEPS, 7.0, "true_uncond")


def test_generator_keys_are_stable_and_distinct():
    first = torch.randn(4, generator=sample_generator(1234, 0, 1))
    assert torch.equal(first, torch.randn(4, generator=sample_generator(1234, 0, 1)))
    for other in [(1234, 1, 0), (1234, 0, 2), (1235, 0, 1)]:
        assert not torch.equal(first, torch.randn(4, generator=sample_generator(*other)))


@pytest.mark.parametrize("prompt, expected", [
    ("a boy standing in the wild", "a <new1> boy standing in the wild"),
    ("A Boy and a girl", "A <new1> Boy and a <new1> girl"),
    ("a cowboy with boys", "a cowboy with boys"),
    ("a <new1> boy already", "a <new1> boy already"),
    ("the boy's dog", "the <new1> boy's dog"),
])
def test_rewrite_prompt_whole_words(prompt, expected):
    assert rewrite_prompt(prompt, "<new1>") == expected


def test_rewrite_prompt_only_with_a_token_and_its_class_words():
    assert rewrite_prompt("a boy", None) == "a boy"
    assert rewrite_prompt("a boy and a girl", "<new1>", ["girl"]) == "a boy and a <new1> girl"


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ("{not json", "not valid JSON"),
    ('{"0": "a boy"}', "list of strings"),
    ('["a boy", 3]', "list of strings"),
    ("[]", "no prompts"),
])
def test_load_prompts_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "prompts.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SamplingInputError, match=message):
        load_prompts(path)


def test_load_prompts_keeps_order(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(["b", "a"]))
    assert load_prompts(path) == ["b", "a"]


def test_generate_images_for_the_base_model(tiny_config):
    tiny_config.sample.steps = 3
    images = generate_images(tiny_config, ["a boy", "a girl", "a boy"], [5, 6, 5], "cpu", batch_size=2)
    assert [im.size for im in images] == [(tiny_config.resolution,) * 2] * 3
    assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in images)
    first, second, third = (np.asarray(im, dtype=np.int16) for im in images)
    assert np.abs(first - third).max() <= 2  # same prompt and seed, other batch position
    assert np.abs(first - second).max() > 10


def test_pipeline_merges_adapters_and_never_builds_gpt2(tiny_config, tmp_path):
    """The loaded pipeline gives the same noise prediction as the unmerged personalization, in eval mode."""
    nnet = load_uvit(tiny_config)
    spec = LoraSpec(r=2, alpha=4.0, target_modules=uvit_lora_modules(nnet))
    add_lora(nnet, spec)
    torch.manual_seed(0)
    for name, param in nnet.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.2)
    save_personalization(tmp_path, {"uvit_lora": spec.to_dict(), "text_encoder_mode": "frozen"}, nnet,
                         load_text_encoder(tiny_config))
    pipeline = load_pipeline(tiny_config, "cpu", tmp_path, count_parameters=True)

    layers = [m for m in pipeline.nnet.modules() if isinstance(m, LoraLayer)]
    assert layers and all(layer.merged for layer in layers)
    assert not any(m.training for m in pipeline.nnet.modules())
    assert pipeline.finetuned_parameters == sum(p.numel() for n, p in nnet.named_parameters() if "lora_" in n)
    assert not any("GPT2" in type(m).__name__ for part in (pipeline.caption_decoder, pipeline.text_encoder)
                   for m in part.modules())

    g = torch.Generator().manual_seed(3)
    args = (torch.randn(1, *latent_shape(tiny_config), generator=g), torch.randn(1, 1, tiny_config.clip_img_dim, generator=g),
            torch.randn(1, 77, tiny_config.text_dim, generator=g), torch.tensor([500.0]), torch.tensor([0.0]),
            torch.tensor([1]))
    with torch.no_grad():
        merged = pipeline.nnet(*args)[0]
        unmerged = nnet.eval()(*args)[0]
        base = load_uvit(tiny_config)(*args)[0]
    assert torch.allclose(merged, unmerged, atol=1e-5)
    assert (merged - base).abs().max() > 1e-3


def test_merging_onto_the_device_places_each_layer_for_inference(tiny_config):
    """merge_lora with a dtype gives what merging in fp32 and then placing the whole model gives, layer by
    layer: matmul weights in the low dtype, normalization weights and positions in fp32 (as autocast reads
    them); the base model the copy shares its weights with is not touched."""
    nnet = load_uvit(tiny_config)
    add_lora(nnet, LoraSpec(r=2, alpha=4.0, target_modules=uvit_lora_modules(nnet)))
    torch.manual_seed(0)
    for name, param in nnet.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.2)
    before = {name: param.detach().clone() for name, param in nnet.named_parameters()}
    placed, reference = weight_sharing_copy(nnet), weight_sharing_copy(nnet)
    assert merge_lora(placed, "test", "cpu", torch.bfloat16) == merge_lora(reference, "test") > 0
    place_for_inference(reference, "cpu", torch.bfloat16)
    ours, theirs = dict(placed.named_parameters()), dict(reference.named_parameters())
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)
    assert placed.in_blocks[0].attn.qkv.base_layer.weight.dtype == torch.bfloat16
    assert placed.mid_block.skip_linear is None and placed.out_blocks[0].skip_linear.weight.dtype == torch.bfloat16
    assert placed.in_blocks[0].norm2.weight.dtype == placed.pos_embed.dtype == torch.float32
    assert all(torch.equal(param, before[name]) and param.dtype == torch.float32
               for name, param in nnet.named_parameters())
