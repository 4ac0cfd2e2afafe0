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
    config.resolution = 512  # pixels; the latent is 4 x resolution/8 x resolution/8 (libs.config.latent_shape)
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

    # --- personalization training (train.py; every key has a flag of the same name) ---
    # Defaults follow the reference entry's recipe (spec §6) except where noted: half its LoRA rank,
    # LoRA kept to the transformer blocks, a class-word-initialized token with its own learning rate,
    # and the DreamBooth prior weight of 1.
    config.train = d(
        # the subject: {token} and {class_word} are filled in; sample.py writes "boy" as "<new1> boy",
        # so the instance prompt puts the token right before the class word too
        class_word="",  # "" = from the photo path: "boy" if it contains "boy", else "girl"
        modifier_token="<new1>",
        initializer_token="",  # "" = the class word: training starts from "a boy", not from noise
        num_vectors=1,  # >1: a multi-vector token (<new1> <new1>_1 ...), more capacity, more parameters
        instance_prompt="a photo of a {token} {class_word}",
        # photos (libs/data.py)
        crop="face",  # the square around the face (crops.json box, else a detector), else centred; or "center"
        hflip=True,  # the mirror image as a second cached view: twice the views of 3-10 photos
        min_image_side=128,  # smaller images are refused: upscaled thumbnails teach blur
        # prior preservation (DreamBooth): class images in every batch keep "boy"/"girl" generic
        with_prior_preservation=True,
        class_data_dir="class_data/{class_word}",  # see `python -m libs.class_images`
        class_prompt="",  # "" = the class set's own captions
        num_class_images=200,
        # the loss: instance_loss_weight x instance image MSE + prior_loss_weight x class image MSE
        #           + clip_img_loss_weight x clip_img MSE (instance and class rows); nothing else
        instance_loss_weight=1.0,
        prior_loss_weight=1.0,  # DreamBooth's 1; the reference entry's balance was about 0.2
        clip_img_loss_weight=1.0,
        # what trains: "token" = only the new embedding row(s) of the text encoder; "lora" = the token
        # and LoRA on CLIP's attention projections; "full" = the token and the whole text tower;
        # "frozen" = no token, the U-ViT LoRA alone learns the subject under the class word
        text_encoder_mode="token",
        lora_targets=("qkv", "proj", "fc1", "fc2", "text_embed", "clip_img_embed"),  # blocks only; see libs/adapters.py
        rank=32,  # reference 64: half the parameters (24.5 M instead of 49.1 M)
        alpha=32.0,  # scale alpha/rank = 1, update size close to the reference's r=64, alpha=32
        lora_dropout=0.1,
        text_lora_rank=8,
        text_lora_alpha=8.0,
        # optimisation: AdamW on the trainable tensors only (fp32), frozen weights in the mixed-precision dtype
        train_step=500,  # optimizer steps
        batch_size=4,  # instance views per step and process
        class_batch_size=4,  # class views per step and process (with prior preservation)
        lr=4e-5,  # U-ViT LoRA (the reference entry's)
        text_lr=1e-4,  # token row(s) and text-encoder LoRA/weights: an embedding needs larger steps
        weight_decay=0.01,  # LoRA and text-encoder weights; never the token rows
        lr_scheduler="constant",  # "constant", "cosine" or "linear", all after the warmup
        warmup_steps=20,
        max_grad_norm=1.0,  # 0 = no clipping
        # speed
        cache_latents=True,  # encode each image view once; False re-encodes every step (slow, for checking)
        cache_dir="",  # also keep encodings on disk, keyed by the image pixels and the encoders
        encode_batch_size=8,
        gradient_checkpointing=False,  # much less activation memory for one more forward pass (~+50% compute)
        compile=False,  # torch.compile the U-ViT: faster steps after a compile of a minute or two
        # runs
        log_every=10,
        checkpointing_steps=100,
        checkpoints_total_limit=1,
        keep_checkpoints=False,  # True keeps the last checkpoint after training (to extend a run later)
        validation_steps=250,  # 0 = only the fixed-noise loss at the start and the end, no images
        validation_prompts=(
            "a photo of a {class_word}",
            "a {class_word} standing in the wild",
            "a {class_word} wearing a suit, oil painting",
            "a close-up photo of a {class_word} smiling",
        ),
    )
    return config


def d(**kwargs) -> ml_collections.ConfigDict:
    """Short constructor for nested config blocks."""
    return ml_collections.ConfigDict(kwargs)
