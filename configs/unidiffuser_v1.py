"""The real UniDiffuser-v1 setup: architecture, weight locations, sampling and training defaults.

Every value here can be overridden from the command line of train.py / sample.py.
Relative paths are resolved against the repository root, so scripts work from any directory.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "unidiffuser_v1"
    config.seed = 1234  # base seed: every random draw of training and sampling is keyed by it

    # --- where the weights live (see models/README.md; `python tools/download.py` fetches them) ---
    config.paths = d(
        nnet="models/uvit_v1.pth",  # the base U-ViT checkpoint
        autoencoder="models/autoencoder_kl.pth",
        caption_decoder="models/caption_decoder.pth",
        # a local Hugging Face folder when present, else this hub id
        clip_text="models/clip-vit-large-patch14",
        clip_text_hub="openai/clip-vit-large-patch14",
        clip_img="models/clip-vit-base-patch32",
        clip_img_hub="openai/clip-vit-base-patch32",
    )

    # --- model facts (spec §4) ---
    config.resolution = 512  # image side in pixels; the latent is 4 x resolution/8 x resolution/8 (a multiple of 16)
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
        steps=50,  # solver steps = model evaluations (the official 50)
        scale=7.0,  # guidance scale s in cond + s(cond - uncond) (the official 7)
        cfg_mode="true_uncond",  # the unconditional pass: true_uncond (official: noise text at t=1000) or empty_token
        n_samples=3,  # images per prompt (the competition grades exactly 3)
        batch_size=3,  # images denoised together, across prompts (cond + uncond share one forward)
        # best-of-N (libs/rerank.py): render candidates x n_samples images per prompt, keep the n_samples best by
        # the competition metric of the run's split; 1 = off, bitwise the plain images
        candidates=1,  # best-of-N: candidates rendered per kept image; N > 1 keeps the n_samples best of n_samples x N
        rerank_weights=(1.0, 1.0, 1.0),  # best-of-N objective weights of face, clip_img, clip_text (clip_text only where judged: *_edit and preliminary files)
        rerank_face_backend="insightface",  # best-of-N face model: insightface (buffalo_l, the competition's) or dlib (offline, not the competition's)
        keep_candidates=False,  # best-of-N: also write every candidate to <output>/candidates/ and their scores to candidates.json
        reference_dir="",  # best-of-N references of a single run; "" = the photo folder train.py recorded (--all: train_data/<name>/)
    )

    # --- personalization training (train.py) ---
    # Every key has a flag of the same name (libs/flags.py); the comment after a key is its --help text.
    # Defaults follow the reference entry's recipe (spec §6) except where noted: half its LoRA rank,
    # LoRA kept to the transformer blocks, a class-word-initialized token with its own learning rate,
    # and the DreamBooth prior weight of 1.
    config.train = d(
        # the subject: sample.py writes "boy" as "<new1> boy", so the instance prompt puts the token right
        # before the class word too
        class_word="",  # "" = from the photo path: "boy" if it contains "boy", else "girl"
        modifier_token="<new1>",  # the new word that learns the subject; sample.py puts it before the class word
        initializer_token="",  # the word the token starts from; "" = the class word ("a boy", not noise)
        num_vectors=1,  # embedding rows of the token; >1 = <new1> <new1>_1 ...: more capacity, more parameters
        instance_prompt="a photo of a {token} {class_word}",  # the photos' prompt; {token}, {class_word} filled in
        # photos (libs/train/images.py)
        crop="face",  # face: the square around the face (crops.json box, else a detector), else centred
        hflip=True,  # the mirror image as a second cached view: twice the views of 3-10 photos
        min_image_side=128,  # smaller images are refused: upscaled thumbnails teach blur
        # prior preservation (DreamBooth)
        with_prior_preservation=True,  # class images in every batch keep "boy"/"girl" generic
        class_data_dir="class_data/{class_word}",  # the class set; {class_word} is filled in (tools/class_images.py)
        class_prompt="",  # one prompt for all class images; "" = the class set's own captions
        num_class_images=200,  # class images used: the first ones of the set
        # the loss: instance_loss_weight x instance image MSE + prior_loss_weight x class image MSE
        #           + clip_img_loss_weight x clip_img MSE (instance and class rows); nothing else, apart
        #           from the two switches after the weights (libs/train/batches.py): masked_loss turns the
        #           instance MSE into a person-mask-weighted mean, min_snr_gamma multiplies every row's terms
        #           by min(SNR, gamma) / SNR. Both off by default: on real weights their effect on the
        #           competition metric is unmeasured here; --auto_recipe measures it per subject
        instance_loss_weight=1.0,  # weight of the instance images' latent MSE
        prior_loss_weight=1.0,  # weight of the class images' latent MSE: DreamBooth's 1; the reference's about 0.2
        clip_img_loss_weight=1.0,  # weight of the CLIP image embedding MSE (instance and class rows)
        masked_loss=False,  # instance latent MSE weighted by the person mask (tools/crop.py masks/); photos without one: plain MSE
        mask_background_weight=0.0,  # with masked_loss: weight of the background latent cells (the person's is 1)
        min_snr_gamma=0.0,  # min-SNR-gamma weighting of every row by min(SNR, gamma) / SNR (5 is usual); 0 = off
        # what trains
        text_encoder_mode="token",  # token: new row(s); lora: + LoRA on CLIP attention; full: + all; frozen: no token
        adapter="lora",  # U-ViT adapter family (peft): lora, dora (LoRA + weight decomposition), loha, lokr, vera, oft; none: no U-ViT adapter
        lora_targets=("qkv", "proj", "fc1", "fc2", "text_embed", "clip_img_embed"),  # U-ViT modules the adapter adapts (libs/adapters/lora.py)
        rank=32,  # U-ViT adapter rank (lora, dora, loha, lokr); the reference's 64 has twice the parameters (49.1 M instead of 24.5 M)
        alpha=32.0,  # U-ViT adapter alpha (lora, dora, loha, lokr): scale alpha/rank = 1, update size close to the reference's r=64, alpha=32
        lora_dropout=0.1,  # dropout on the LoRA inputs (U-ViT and text encoder)
        lokr_factor=0,  # adapter lokr: the Kronecker factor size of each side (0 = as square as possible)
        oft_block_size=32,  # adapter oft: the orthogonal blocks' size; it must divide every target's input size
        vera_rank=256,  # adapter vera: rank of the shared random projections (seed-generated, not trained)
        text_lora_rank=8,  # text-encoder LoRA rank (text_encoder_mode lora)
        text_lora_alpha=8.0,  # text-encoder LoRA alpha (text_encoder_mode lora)
        # optimisation: AdamW on the trainable tensors only (fp32), frozen weights in the mixed-precision dtype
        train_step=500,  # optimizer steps
        batch_size=4,  # instance views per step and process
        class_batch_size=4,  # class views per step and process (with prior preservation)
        lr=4e-5,  # learning rate of the U-ViT LoRA (the reference entry's)
        text_lr=1e-4,  # learning rate of the token row(s) and text-encoder weights: an embedding needs larger steps
        weight_decay=0.01,  # AdamW weight decay of the LoRA and text-encoder weights; never the token rows
        lr_scheduler="constant",  # the learning-rate schedule after the warmup
        warmup_steps=20,  # steps of linear learning-rate warmup
        max_grad_norm=1.0,  # gradient-norm clipping; 0 = no clipping
        ema_decay=0.0,  # moving average of the trained tensors (e.g. 0.99); validation, selection and the written adapters use it; 0 = off
        # speed
        cache_latents=True,  # encode each image view once; off re-encodes every step (slow, for checking)
        cache_dir="",  # also keep encodings on disk here, keyed by the image pixels and the encoders
        encode_batch_size=8,  # images per encoder batch (caching and the fixed-noise loss)
        gradient_checkpointing=False,  # much less activation memory for one more forward pass (~+50% compute)
        compile=False,  # torch.compile the U-ViT: faster steps after a compile of a minute or two
        # runs
        log_every=10,  # log the loss every N steps (logs/train_log.jsonl, TensorBoard)
        checkpointing_steps=100,  # write a checkpoint (for --resume) every N steps
        checkpoints_total_limit=1,  # checkpoints kept during training
        keep_checkpoints=False,  # keep the last checkpoint after training (to extend a run later)
        # validation: the competition metric on fixed-seed images during training (libs/train/metrics.py)
        validation_steps=125,  # validate (images + metric) every N steps and at the end; 0 = only the fixed-noise loss at start and end (and the last step is kept)
        validation_sim_prompts=(  # "sim" validation prompts (the subject as photographed); the token goes before the class word
            "a photo of a {class_word}",
            "a close-up photo of a {class_word} smiling",
        ),
        validation_edit_prompts=(  # "edit" validation prompts (places, clothes, actions, styles), scored with CLIP-T too
            "a {class_word} standing on a beach at sunset",
            "a {class_word} wearing a red hoodie in a cafe",
            "a {class_word} riding a bicycle in the city",
            "an oil painting of a {class_word} in the style of Van Gogh",
        ),
        validation_images=1,  # images per validation prompt (score.py reads 3 per prompt when re-scoring the folder)
        validation_sample_steps=20,  # DPM-Solver++ steps of a validation image (sample.py uses sample.steps, 50)
        validation_batch_size=8,  # validation images denoised together
        validation_face_backend="auto",  # auto: insightface buffalo_l when installed, else dlib, else none (CLIP only)
        # which step's adapters are written (libs/train/selection.py)
        selection="best",  # best: the validated step with the highest objective; last: the last step
        objective="sim_face + edit_face + edit_clip_text",  # "best" by [weight*]metric terms joined by +; metrics: sim_face sim_clip_img edit_face edit_clip_img edit_clip_text
        # the automatic recipe (libs/train/auto_recipe.py)
        auto_recipe=False,  # train the auto_recipes candidates (within auto_budget) and write the best by objective - penalty
        auto_recipes=("base", "half_rank", "double_lr", "identity_levers", "text_lora", "longer"),  # candidates, in order
        auto_budget=2000,  # optimizer steps of all candidates together; one that does not fit is skipped
        auto_param_penalty=0.002,  # objective points subtracted per million changed parameters (U-ViT r=32: 0.049)
        auto_max_parameters=0,  # recipes that would change more parameters are left out before training; 0 = no limit
        auto_devices="",  # recipes trained concurrently, one process per device: cuda:0,cuda:1 (cpu,cpu without GPUs); "" = in this process
    )
    return config


def d(**kwargs) -> ml_collections.ConfigDict:
    """Short constructor for nested config blocks."""
    return ml_collections.ConfigDict(kwargs)
