"""The tiny world: the real architecture at toy sizes, for tests and the CPU demo.

`python tools/tiny_world.py` writes a complete model set for this config into `tiny_world/models/`
in exactly the real file formats, so the production loaders are what the tests exercise.
"""
import ml_collections

from configs.unidiffuser_v1 import get_config as get_real_config

TINY_MODELS = "tiny_world/models"


def get_config() -> ml_collections.ConfigDict:
    config = get_real_config()
    config.name = "tiny"
    config.paths.nnet = f"{TINY_MODELS}/uvit_v1.pth"
    config.paths.autoencoder = f"{TINY_MODELS}/autoencoder_kl.pth"
    config.paths.caption_decoder = f"{TINY_MODELS}/caption_decoder.pth"
    config.paths.clip_text = f"{TINY_MODELS}/clip-vit-large-patch14"
    config.paths.clip_text_hub = ""  # never fall back to the hub for the tiny world
    config.paths.clip_img = f"{TINY_MODELS}/clip-vit-base-patch32"
    config.paths.clip_img_hub = ""

    config.resolution = 64
    config.clip_img_dim = 16
    config.clip_text_dim = 32
    config.text_dim = 8

    config.nnet.update(
        img_size=8,
        embed_dim=32,
        depth=4,
        num_heads=2,
        text_dim=config.text_dim,
        clip_img_dim=config.clip_img_dim,
    )
    # GroupNorm(32, C) in the LDM blocks needs channel counts that are multiples of 32
    config.autoencoder.update(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)
    config.caption_decoder.update(prefix_dim=config.clip_text_dim, hidden_dim=config.text_dim)

    # sizes of the tiny Hugging Face CLIP towers (real CLIP BPE vocabulary)
    config.tiny_clip = ml_collections.ConfigDict(
        dict(
            text_hidden=config.clip_text_dim,
            text_layers=2,
            text_heads=2,
            vision_hidden=32,
            vision_layers=2,
            vision_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=config.clip_img_dim,
        )
    )
    config.sample.steps = 6
    # toy-sized training: a few steps, small batches, large learning rates so a short run visibly learns
    config.train.update(
        crop="center",  # the tests' photos need no face detector
        min_image_side=32,
        num_class_images=4,
        rank=4,
        alpha=4.0,
        oft_block_size=4,
        vera_rank=8,
        text_lora_rank=2,
        text_lora_alpha=2.0,
        train_step=8,
        batch_size=2,
        class_batch_size=2,
        lr=1e-3,
        text_lr=1e-2,
        warmup_steps=0,
        encode_batch_size=4,
        log_every=1,
        checkpointing_steps=4,
        validation_steps=0,
        validation_sim_prompts=("a photo of a {class_word}",),
        validation_edit_prompts=("a {class_word} standing in the wild",),
        validation_sample_steps=2,
        auto_budget=16,
    )
    return config
