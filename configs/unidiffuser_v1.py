"""The real UniDiffuser-v1 setup: architecture, weight locations, sampling and training defaults.

Every value here can be overridden from the command line of train.py / sample.py.
Relative paths are resolved against the repository root, so scripts work from any directory.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "unidiffuser_v1"
    config.seed = 1234

    # --- where the weights live (see models/README.md; `python -m libs.download` fetches them) ---
    config.paths = d(
        nnet="models/uvit_v1.pth",
        autoencoder="models/autoencoder_kl.pth",
        caption_decoder="models/caption_decoder.pth",
        # a local Hugging Face folder when present, else this hub id
        clip_text="models/clip-vit-large-patch14",
        clip_text_hub="openai/clip-vit-large-patch14",
        clip_img="models/clip-vit-base-patch32",
        clip_img_hub="openai/clip-vit-base-patch32",
    )

    # --- model facts (spec §4) ---
    config.z_shape = (4, 64, 64)
    config.resolution = 512  # pixels = 8 x latent size
    config.clip_img_dim = 512
    config.clip_text_dim = 768
    config.text_dim = 64
    config.num_text_tokens = 77
    config.data_type = 1

    config.nnet = d(
        img_size=64,
        in_chans=4,
        patch_size=2,
        embed_dim=1536,
        depth=30,
        num_heads=24,
        mlp_ratio=4,
        qkv_bias=False,
        pos_drop_rate=0.0,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        mlp_time_embed=False,
        text_dim=64,
        num_text_tokens=77,
        clip_img_dim=512,
        use_checkpoint=False,
    )

    config.autoencoder = d(
        double_z=True,
        z_channels=4,
        resolution=256,
        in_channels=3,
        out_ch=3,
        ch=128,
        ch_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        attn_resolutions=(),
        dropout=0.0,
        embed_dim=4,
        scale_factor=0.18215,
    )

    config.caption_decoder = d(prefix_dim=768, hidden_dim=64)

    # --- sampling (spec §5; official defaults) ---
    config.sample = d(
        steps=50,
        scale=7.0,
        cfg_mode="true_uncond",  # or "empty_token"
        n_samples=3,
        batch_size=3,  # images denoised together (cond + uncond share one forward)
    )
    return config


def d(**kwargs) -> ml_collections.ConfigDict:
    """Short constructor for nested config blocks."""
    return ml_collections.ConfigDict(kwargs)
