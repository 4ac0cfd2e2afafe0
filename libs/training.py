"""Personalization training: a new token, optional text-encoder adapters and a U-ViT LoRA, trained with
UniDiffuser's joint noise-prediction loss and DreamBooth prior preservation.

One step (spec §5): each sample gets one timestep n in 1..1000 shared by its image latent z (drawn from
the cached VAE posterior) and its CLIP image embedding, independent Gaussian noise for each,
x_n = sqrt(abar_n) x_0 + sqrt(1 - abar_n) eps with the Stable-Diffusion betas; the text is
encode_prefix(CLIP(prompt)) at t_text = 0; the U-ViT predicts both noises and the loss is

    instance_loss_weight x MSE(z, instance rows) + prior_loss_weight x MSE(z, class rows)
    + clip_img_loss_weight x MSE(clip_img, all rows).

Everything random in step k (which views, posterior samples, timesteps, noise, dropout) is drawn from
generators keyed by (seed, k, process), so a resumed run repeats exactly what an uninterrupted one does.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import ml_collections
import torch
import torch.nn.functional as F
from PIL import Image
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn
from tqdm.auto import tqdm

from libs import personalization as adapters
from libs.checkpoint import atomic_path, file_sha256, load_safetensors, safe_torch_load, save_json, save_safetensors
from libs.config import REPO_ROOT, latent_shape
from libs.data import ImageEncoder, LatentSource, TrainImage, describe_sources, load_class_images, load_instance_images
from libs.diffusion import N_TRAIN_STEPS, add_noise, alphas_cumprod, keyed_generator as sample_generator
from libs.download import TRAINING_WEIGHTS, ensure_weights
from libs.errors import UserError
from libs.grids import image_grid
from libs.lora import LoraSpec, add_lora, text_lora_modules, uvit_lora_modules
from libs.models.loading import (image_encoder_source, load_autoencoder, load_caption_decoder, load_image_encoder,
                                 load_text_encoder, load_uvit)
from libs.personalization import save_personalization
from libs.precision import autocast
from libs.prompts import fill_prompt, rewrite_prompt
from libs.sampling import T2IPipeline
from libs.subjects import class_word_from_path

RUN_FILE = "train_config.json"
LOG_DIR = "logs"
LOG_FILE = "train_log.jsonl"
TENSORBOARD_DIR = "tensorboard"
VALIDATION_DIR = "validation"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_STATE = "training_state.json"
CHECKPOINT_WEIGHTS = "trainable.safetensors"
CHECKPOINT_OPTIMIZER = "optimizer.pt"
OUTPUT_FILES = (adapters.META_FILE, adapters.UVIT_LORA_FILE, adapters.TOKEN_FILE, adapters.TEXT_LORA_FILE,
                adapters.TEXT_FULL_FILE, RUN_FILE)
SCHEDULERS = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}
TEXT_MODES = adapters.TEXT_ENCODER_MODES
EVAL_TIMESTEPS = (100, 300, 500, 700, 900)  # the fixed-noise loss: one pass per timestep over the photos
# keys that may change when a run is resumed: they do not change what a step computes
RESUMABLE_CHANGES = ("train_step", "log_every", "checkpointing_steps", "checkpoints_total_limit", "keep_checkpoints",
                     "validation_steps", "validation_prompts", "cache_latents", "cache_dir", "encode_batch_size",
                     "gradient_checkpointing", "compile")
PACKAGES = ("torch", "transformers", "peft", "accelerate", "safetensors", "numpy", "pillow", "ml_collections")
# independent random streams of one step
STREAM_INSTANCE, STREAM_CLASS, STREAM_NOISE, STREAM_DROPOUT, STREAM_EVAL = range(1, 6)


class TrainingError(UserError):
    """A problem with the request (flags, output folder, checkpoint) found before anything is written."""


# --- the plan: everything decided before a file is touched ---------------------------------------


@dataclass
class Plan:
    """The resolved request: paths, words, prompts, and what to resume from."""

    config: ml_collections.ConfigDict
    data_dir: Path
    out_dir: Path
    class_word: str
    token: str | None
    initializer: str
    instance_prompt: str
    class_dir: Path | None
    resume_from: Path | None = None
    finished: bool = False  # the output already holds a finished personalization

    @property
    def train(self) -> ml_collections.ConfigDict:
        return self.config.train


def make_plan(config: ml_collections.ConfigDict, data_dir: str | Path, out_dir: str | Path,
              resume: str | None = None, overwrite: bool = False) -> Plan:
    """Check the flags and the output folder; raises TrainingError, writes nothing."""
    cfg = config.train
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if cfg.text_encoder_mode not in TEXT_MODES:
        raise TrainingError(f"text_encoder_mode {cfg.text_encoder_mode!r} not in {TEXT_MODES}")
    if cfg.lr_scheduler not in SCHEDULERS:
        raise TrainingError(f"lr_scheduler {cfg.lr_scheduler!r} not in {tuple(SCHEDULERS)}")
    if "text_out" in cfg.lora_targets:
        raise TrainingError("LoRA target text_out never gets a gradient from the text-to-image loss (the text is "
                            "clean, t_text = 0): leave it out")
    for key in ("train_step", "batch_size", "num_vectors", "rank", "log_every", "checkpointing_steps",
                "checkpoints_total_limit", "encode_batch_size"):
        if int(cfg[key]) < 1:
            raise TrainingError(f"{key} must be at least 1, got {cfg[key]}")
    if cfg.with_prior_preservation and (cfg.class_batch_size < 1 or cfg.num_class_images < 1):
        raise TrainingError("prior preservation needs class_batch_size >= 1 and num_class_images >= 1")
    latent_shape(config)  # the resolution must fit the VAE and the patch size
    if resume and overwrite:
        raise TrainingError("--resume and --overwrite contradict each other: pick one")
    ensure_weights(config, TRAINING_WEIGHTS)  # now, not after the photos are read

    class_word = cfg.class_word or class_word_from_path(data_dir)
    token = cfg.modifier_token if cfg.text_encoder_mode != "frozen" else None
    if token is not None and not token.strip():
        raise TrainingError("modifier_token is empty; use e.g. <new1> (or text_encoder_mode frozen for no token)")
    instance_prompt = fill_prompt(cfg.instance_prompt, token, class_word)
    if token and token not in instance_prompt:
        raise TrainingError(f"the instance prompt {instance_prompt!r} does not contain the token {token}: "
                            "the token would never train (put {token} in --instance_prompt)")
    class_dir = None
    if cfg.with_prior_preservation:
        class_dir = Path(cfg.class_data_dir.replace("{class_word}", class_word))

    plan = Plan(config, data_dir, out_dir, class_word, token, cfg.initializer_token or class_word, instance_prompt,
                class_dir)
    _check_output(plan, resume, overwrite)
    return plan


def _check_output(plan: Plan, resume: str | None, overwrite: bool) -> None:
    out = plan.out_dir
    if out.exists() and not out.is_dir():
        raise TrainingError(f"output path {out} is a file, not a folder")
    plan.finished = (out / adapters.META_FILE).is_file()
    checkpoints = list_checkpoints(out)
    if resume:
        if resume == "latest":
            plan.resume_from = checkpoints[-1] if checkpoints else None
        else:
            plan.resume_from = Path(resume)
            if not (plan.resume_from / CHECKPOINT_STATE).is_file():
                raise TrainingError(f"--resume {resume}: not a checkpoint folder (no {CHECKPOINT_STATE}); "
                                    f"checkpoints live in {out / CHECKPOINT_DIR}")
        return
    if overwrite:
        return
    if plan.finished:
        raise TrainingError(f"{out} already holds a finished personalization; pass --overwrite to train it again "
                            "(or --resume latest to continue from its last checkpoint)")
    if checkpoints:
        raise TrainingError(f"{out} holds checkpoints of an unfinished run (latest: {checkpoints[-1].name}); "
                            "pass --resume latest to continue it or --overwrite to start over")


# --- the model ------------------------------------------------------------------------------------


class JointNoisePredictor(nn.Module):
    """The U-ViT with its text path (CLIP text tower -> encode_prefix) as one module, so that one
    forward per step covers every trainable tensor (what DistributedDataParallel needs)."""

    def __init__(self, nnet: nn.Module, text_encoder: nn.Module, caption_prefix: nn.Module, data_type: int):
        super().__init__()
        self.nnet = nnet
        self.text_encoder = text_encoder
        self.caption_prefix = caption_prefix
        self.data_type = data_type

    def encode_text(self, input_ids: Tensor) -> Tensor:
        """Token ids [B, 77] -> U-ViT text tokens [B, 77, text_dim]; repeated prompts are encoded once."""
        unique, inverse = torch.unique(input_ids, dim=0, return_inverse=True)
        return self.caption_prefix(self.text_encoder(unique))[inverse]

    def forward(self, z_t: Tensor, clip_t: Tensor, timesteps: Tensor, text_ids: Tensor | None,
                text_cached: Tensor | None) -> tuple[Tensor, Tensor]:
        """Noise predictions for (z, clip_img); the text rows are `text_ids` encoded now, then `text_cached`."""
        parts = []
        if text_ids is not None:
            parts.append(self.encode_text(text_ids.to(z_t.device)))
        if text_cached is not None:
            parts.append(text_cached.to(z_t.device))
        text = torch.cat(parts) if len(parts) > 1 else parts[0]
        batch = z_t.shape[0]
        t_text = torch.zeros(batch, device=z_t.device)
        data_type = torch.full((batch,), self.data_type, dtype=torch.long, device=z_t.device)
        img_out, clip_out, _ = self.nnet(z_t, clip_t, text, timesteps.to(z_t.device, torch.float32), t_text, data_type)
        return img_out, clip_out


# --- models ---------------------------------------------------------------------------------------


@dataclass
class Models:
    model: JointNoisePredictor
    autoencoder: nn.Module
    uvit_spec: LoraSpec
    text_spec: LoraSpec | None

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]


def build_models(config: ml_collections.ConfigDict, plan: Plan, device: torch.device,
                 weight_dtype: torch.dtype) -> Models:
    """Base towers frozen in `weight_dtype`; LoRA, token rows and trained text weights in fp32."""
    cfg = config.train
    nnet = load_uvit(config, "cpu", torch.float32)
    uvit_spec = LoraSpec(r=int(cfg.rank), alpha=float(cfg.alpha), dropout=float(cfg.lora_dropout),
                         target_modules=uvit_lora_modules(nnet, list(cfg.lora_targets)))
    add_lora(nnet, uvit_spec)
    nnet.set_gradient_checkpointing(bool(cfg.gradient_checkpointing))

    text_encoder = load_text_encoder(config, "cpu")
    mode = cfg.text_encoder_mode
    if plan.token:
        try:
            text_encoder.add_modifier_token(plan.token, plan.initializer, int(cfg.num_vectors))
        except ValueError as error:
            raise TrainingError(f"modifier token: {error}") from error
    text_spec = None
    if mode == "lora":
        text_spec = LoraSpec(r=int(cfg.text_lora_rank), alpha=float(cfg.text_lora_alpha),
                             dropout=float(cfg.lora_dropout), target_modules=text_lora_modules(text_encoder))
        add_lora(text_encoder.transformer, text_spec)
    caption_prefix = load_caption_decoder(config, "cpu", torch.float32)

    model = JointNoisePredictor(nnet, text_encoder, caption_prefix, int(config.data_type)).requires_grad_(False)
    for name, param in nnet.named_parameters():
        param.requires_grad_("lora_" in name)
    if plan.token:
        text_encoder.token_embedding.extra_weight.requires_grad_(True)
    if mode == "lora":
        for name, param in text_encoder.transformer.named_parameters():
            if "lora_" in name:
                param.requires_grad_(True)
    elif mode == "full":
        text_encoder.transformer.requires_grad_(True)
    for param in model.parameters():
        param.data = param.data.to(torch.float32 if param.requires_grad else weight_dtype)
    if weight_dtype != torch.float32:
        # autocast runs the LoRA matmuls in weight_dtype anyway: skip peft's fp32 copy of every LoRA input
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.cast_input_dtype_enabled = False
    model.to(device)
    if cfg.compile:
        nnet.compile()
    autoencoder = load_autoencoder(config, device, torch.float32)
    return Models(model, autoencoder, uvit_spec, text_spec)


def count_trainable(module: nn.Module) -> int:
    """The exact number of trained parameters (what sample.py's changed-parameter count will find)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def make_optimizer(models: Models, cfg: ml_collections.ConfigDict) -> torch.optim.Optimizer:
    """AdamW over the trainable tensors only: U-ViT LoRA at `lr`; the text side at `text_lr`, the token rows
    without weight decay (decay would pull an embedding out of the vocabulary's range)."""
    groups: dict[str, dict[str, Any]] = {
        "uvit": {"params": [], "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        "token": {"params": [], "lr": cfg.text_lr, "weight_decay": 0.0},
        "text": {"params": [], "lr": cfg.text_lr, "weight_decay": cfg.weight_decay},
    }
    for name, param in models.trainable():
        key = "uvit" if name.startswith("nnet.") else "token" if name.endswith("extra_weight") else "text"
        groups[key]["params"].append(param)
    return torch.optim.AdamW([g for g in groups.values() if g["params"]], betas=(0.9, 0.999), eps=1e-8)


# --- data -----------------------------------------------------------------------------------------


@dataclass
class TrainData:
    """Cached image encodings and text inputs of the instance and class sets."""

    instance: LatentSource
    instance_ids: Tensor  # [1, 77] the instance prompt's token ids
    instance_encoded: Tensor | None  # [1, 77, text_dim] when the instance prompt is encoded once (frozen mode)
    classes: LatentSource | None = None
    class_ids: Tensor | None = None  # [M, 77], one per class image
    class_text: Tensor | None = None  # [M, 77, text_dim] when class prompts are encoded once
    warnings: list[str] = field(default_factory=list)

    def instance_text(self, count: int) -> tuple[Tensor | None, Tensor | None]:
        """(token ids to encode, encoded text) for `count` instance rows: one of the two is None."""
        if self.instance_encoded is not None:
            return None, self.instance_encoded.expand(count, -1, -1)
        return self.instance_ids.expand(count, -1), None


def encoder_fingerprint(config: ml_collections.ConfigDict) -> str:
    """Names the VAE and CLIP image weights, for the disk cache key (hashes are cached beside the files)."""
    clip = image_encoder_source(config)
    folder = Path(clip)
    clip_files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) if folder.is_dir() else []
    parts = [cached_sha256(config.paths.autoencoder)] + [cached_sha256(p) for p in clip_files]
    return "|".join(parts or [clip]) + ("" if clip_files else f"|{clip}")


def build_data(config: ml_collections.ConfigDict, plan: Plan, instance: list[TrainImage],
               classes: list[TrainImage] | None, models: Models, device: torch.device, is_main: bool) -> TrainData:
    """Encode every view once (VAE moments, CLIP image embeddings) and the prompts that do not train."""
    cfg = config.train
    clip_image = load_image_encoder(config, device)
    encoder = ImageEncoder(models.autoencoder, clip_image, device)
    # the disk cache is the main process's: the others encode for themselves (seconds) and write nothing
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir and cfg.cache_latents and is_main else None
    cache = dict(cached=bool(cfg.cache_latents), batch_size=int(cfg.encode_batch_size), cache_dir=cache_dir,
                 cache_key=encoder_fingerprint(config) if cache_dir else "")
    model = models.model
    text_encoder = model.text_encoder
    mode = cfg.text_encoder_mode
    instance_ids = text_encoder.tokenize([plan.instance_prompt])
    data = TrainData(LatentSource(instance, bool(cfg.hflip), encoder, **cache), instance_ids,
                     _encode_once(model, instance_ids) if mode == "frozen" else None)
    if classes:
        prompts = [image.caption for image in classes]
        data.classes = LatentSource(classes, bool(cfg.hflip), encoder, **cache)
        data.class_ids = text_encoder.tokenize(prompts)
        text_trains = mode in ("lora", "full") or (plan.token is not None and any(plan.token in p for p in prompts))
        if not text_trains:
            data.class_text = _encode_once(model, data.class_ids)
    return data


def _encode_once(model: JointNoisePredictor, ids: Tensor, chunk: int = 64) -> Tensor:
    with torch.no_grad():
        device = next(model.caption_prefix.parameters()).device
        return torch.cat([model.encode_text(part.to(device)).float().cpu() for part in ids.split(chunk)])


# --- batches --------------------------------------------------------------------------------------


class ViewSampler:
    """Which views a step uses: epochs of seeded permutations, so every view is seen equally often.

    Stateless: the views of step k depend only on (seed, k, process), which makes resuming exact.
    """

    def __init__(self, num_views: int, batch_size: int, seed: int, rank: int, stream: int):
        self.num_views, self.batch_size = num_views, batch_size
        self.keys = (seed, rank, stream)
        self._perms: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.num_views, generator=sample_generator(*self.keys, epoch))}
        return self._perms[epoch]

    def __call__(self, step: int) -> Tensor:
        positions = range((step - 1) * self.batch_size, step * self.batch_size)
        return torch.stack([self._perm(p // self.num_views)[p % self.num_views] for p in positions])


@dataclass
class Batch:
    z_t: Tensor
    clip_t: Tensor
    timesteps: Tensor
    eps_z: Tensor
    eps_clip: Tensor
    text_ids: Tensor | None
    text_cached: Tensor | None
    num_instance: int


def noisy_batch(moments: Tensor, clip: Tensor, autoencoder: nn.Module, abar: Tensor, generator: torch.Generator,
                timesteps: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Posterior sample z_0, then (z_n, clip_n, n, eps_z, eps_clip) with one n per sample shared by both."""
    z0 = autoencoder.sample(moments, generator=generator)
    clip0 = clip.unsqueeze(1)
    batch = z0.shape[0]
    if timesteps is None:
        timesteps = torch.randint(1, N_TRAIN_STEPS + 1, (batch,), generator=generator)
    eps_z = torch.randn(z0.shape, generator=generator)
    eps_clip = torch.randn(clip0.shape, generator=generator)
    z_t, clip_t = add_noise(z0, eps_z, timesteps, abar), add_noise(clip0, eps_clip, timesteps, abar)
    return z_t, clip_t, timesteps, eps_z, eps_clip


class BatchMaker:
    """Builds step k's batch: instance views first, then class views; all randomness keyed by (seed, k, rank)."""

    def __init__(self, data: TrainData, cfg: ml_collections.ConfigDict, autoencoder: nn.Module, seed: int, rank: int):
        self.data, self.autoencoder, self.seed, self.rank = data, autoencoder, seed, rank
        self.abar = alphas_cumprod()
        self.instance_views = ViewSampler(len(data.instance), int(cfg.batch_size), seed, rank, STREAM_INSTANCE)
        self.class_views = (ViewSampler(len(data.classes), int(cfg.class_batch_size), seed, rank, STREAM_CLASS)
                            if data.classes is not None else None)

    def __call__(self, step: int) -> Batch:
        data = self.data
        views = self.instance_views(step)
        moments, clip = data.instance.lookup(views)
        instance_ids, instance_encoded = data.instance_text(len(views))
        ids = [instance_ids] if instance_ids is not None else []
        cached = [instance_encoded] if instance_encoded is not None else []
        if self.class_views is not None:
            class_views = self.class_views(step)
            class_moments, class_clip = data.classes.lookup(class_views)
            moments, clip = torch.cat([moments, class_moments]), torch.cat([clip, class_clip])
            images = class_views // data.classes.num_flips
            if data.class_text is not None:
                cached.append(data.class_text[images])
            else:
                ids.append(data.class_ids[images])
        generator = sample_generator(self.seed, step, self.rank, STREAM_NOISE)
        z_t, clip_t, n, eps_z, eps_clip = noisy_batch(moments, clip, self.autoencoder, self.abar, generator)
        return Batch(z_t, clip_t, n, eps_z, eps_clip, torch.cat(ids) if ids else None,
                     torch.cat(cached) if cached else None, len(views))


def loss_terms(model: nn.Module, batch: Batch, device: torch.device) -> dict[str, Tensor]:
    """The three MSE terms of the joint loss (fp32); `class` is absent without class rows."""
    img_out, clip_out = model(batch.z_t.to(device), batch.clip_t.to(device), batch.timesteps, batch.text_ids,
                              batch.text_cached)
    eps_z, eps_clip = batch.eps_z.to(device), batch.eps_clip.to(device)
    k = batch.num_instance
    terms = {"instance": F.mse_loss(img_out[:k].float(), eps_z[:k])}
    if img_out.shape[0] > k:
        terms["class"] = F.mse_loss(img_out[k:].float(), eps_z[k:])
    terms["clip_img"] = F.mse_loss(clip_out.float(), eps_clip)
    return terms


def total_loss(terms: dict[str, Tensor], cfg: ml_collections.ConfigDict) -> Tensor:
    loss = cfg.instance_loss_weight * terms["instance"] + cfg.clip_img_loss_weight * terms["clip_img"]
    if "class" in terms:
        loss = loss + cfg.prior_loss_weight * terms["class"]
    return loss


@torch.no_grad()
def fixed_noise_loss(model: JointNoisePredictor, data: TrainData, autoencoder: nn.Module, seed: int,
                     device: torch.device, batch_size: int) -> dict[str, float]:
    """Instance-photo losses at fixed timesteps and fixed noise: a smooth progress signal (the training
    loss jumps with the random timesteps)."""
    was_training = model.training
    model.eval()
    source = data.instance
    views = torch.arange(0, len(source), source.num_flips)
    generator = sample_generator(seed, STREAM_EVAL)
    abar = alphas_cumprod()
    sums = {"instance": 0.0, "clip_img": 0.0}
    count = 0
    for n in EVAL_TIMESTEPS:
        for chunk in views.split(batch_size):
            moments, clip = source.lookup(chunk)
            timesteps = torch.full((len(chunk),), n, dtype=torch.long)
            noisy = noisy_batch(moments, clip, autoencoder, abar, generator, timesteps)
            batch = Batch(*noisy, *data.instance_text(len(chunk)), len(chunk))
            terms = loss_terms(model, batch, device)
            sums["instance"] += terms["instance"].item() * len(chunk)
            sums["clip_img"] += terms["clip_img"].item() * len(chunk)
            count += len(chunk)
    model.train(was_training)
    return {f"eval_loss_{k}": v / count for k, v in sums.items()}


# --- checkpoints ----------------------------------------------------------------------------------


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints (they are renamed into place only when fully written), oldest first."""
    folder = Path(out_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and (p / CHECKPOINT_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: Any, state: dict[str, Any], keep: int) -> Path:
    """Trainable tensors, optimizer/scheduler/loss-scaler state and the recipe, written to a temporary
    folder and renamed into place; then all but the newest `keep` checkpoints are removed."""
    folder = out_dir / CHECKPOINT_DIR
    final = folder / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = folder / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_safetensors({n: p for n, p in model.named_parameters() if p.requires_grad}, tmp / CHECKPOINT_WEIGHTS)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None}, tmp / CHECKPOINT_OPTIMIZER)
    save_json({**state, "step": step}, tmp / CHECKPOINT_STATE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    scaler: Any) -> dict[str, Any]:
    """Restore what save_checkpoint wrote; returns its state (step, recipe, data)."""
    state = json.loads((path / CHECKPOINT_STATE).read_text())
    weights = load_safetensors(path / CHECKPOINT_WEIGHTS, "checkpoint weights")
    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != set(own):
        missing, extra = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
        raise TrainingError(f"{path} does not fit this model (missing {missing[:3]}, unexpected {extra[:3]}); "
                            "was it written with other LoRA targets or text-encoder mode?")
    with torch.no_grad():
        for name, param in own.items():
            param.copy_(weights[name])
    rest = safe_torch_load(path / CHECKPOINT_OPTIMIZER, "optimizer state")
    optimizer.load_state_dict(rest["optimizer"])
    scheduler.load_state_dict(rest["scheduler"])
    if scaler is not None and rest["scaler"] is not None:
        scaler.load_state_dict(rest["scaler"])
    return state


def recipe_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Settings that changed since the checkpoint and change what a step computes."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys
            if k not in RESUMABLE_CHANGES and _plain(saved.get(k)) != _plain(current.get(k))]


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=list))


# --- run records ----------------------------------------------------------------------------------


def cached_sha256(path: str | Path) -> str:
    """sha256 of a (large) file, remembered in `<file>.sha256` next to it while size and mtime match."""
    path = Path(path)
    stat = path.stat()
    sidecar = path.with_name(path.name + ".sha256")
    try:
        known = json.loads(sidecar.read_text())
        if known["size"] == stat.st_size and known["mtime_ns"] == stat.st_mtime_ns:
            return known["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = file_sha256(path)
    try:
        save_json({"sha256": digest, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}, sidecar)
    except OSError:
        pass  # a read-only model folder: hash again next time
    return digest


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=5)
        versions["git_commit"] = commit.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        versions["git_commit"] = "unknown"
    return versions


class RunLog:
    """JSONL lines under logs/ and TensorBoard scalars when tensorboard is installed (main process only).

    A run resumed from step k first drops what an interrupted run logged after step k, so the log reads
    like the one of an uninterrupted run.
    """

    def __init__(self, out_dir: Path, enabled: bool, start_step: int):
        self.enabled = enabled
        self.writer = None
        self.path = out_dir / LOG_DIR / LOG_FILE
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if start_step and self.path.is_file():
                kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept))
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / LOG_DIR / TENSORBOARD_DIR),
                                            purge_step=start_step + 1 if start_step else None)
            except ImportError:
                self.writer = None

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def image(self, tag: str, image: Image.Image, step: int) -> None:
        if self.writer is not None:
            import numpy as np

            self.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# --- the run --------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    trainable_parameters: int
    files: list[Path]


StepCallback = Callable[[int, dict[str, float]], None]


def train(config: ml_collections.ConfigDict, data_dir: str | Path, out_dir: str | Path, resume: str | None = None,
          overwrite: bool = False, mixed_precision: str | None = None,
          on_step: StepCallback | None = None) -> TrainResult | None:
    """Train one subject and write its personalization into `out_dir`; None when there was nothing to do.

    Every check (flags, photos, class set, output folder, model files) runs before the first write.
    `on_step(step, logs)` is called after every optimizer step (e.g. to watch the loss); an exception
    it raises stops the run like an interruption would, leaving the last checkpoint to resume from.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    cfg = config.train
    plan = make_plan(config, data_dir, out_dir, resume, overwrite)
    accelerator = Accelerator(mixed_precision=mixed_precision)
    log = accelerator.print
    if plan.resume_from is None and resume and plan.finished:
        log(f"{plan.out_dir} already holds a finished personalization and no checkpoint: nothing to resume "
            "(pass --overwrite to train again)")
        return None

    instance = load_instance_images(plan.data_dir, config.resolution, cfg.crop, int(cfg.min_image_side))
    classes, class_warning = None, None
    if plan.class_dir is not None:
        classes, class_warning = load_class_images(plan.class_dir, config.resolution, int(cfg.num_class_images),
                                                   int(cfg.min_image_side), cfg.class_prompt)

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    seed = int(config.seed)
    set_seed(seed)
    models = build_models(config, plan, accelerator.device, weight_dtype)
    trainable_parameters = count_trainable(models.model)
    recipe = _recipe(config, plan)
    sources = describe_sources(instance) + (describe_sources(classes) if classes else [])

    if resume and plan.resume_from is None:
        log(f"no checkpoint in {plan.out_dir / CHECKPOINT_DIR}: starting a fresh run")
    if accelerator.is_main_process:
        _prepare_output(plan.out_dir, overwrite)
        save_json({"config": config.to_dict(), "data_dir": str(plan.data_dir), "class_dir": str(plan.class_dir),
                   "instance_prompt": plan.instance_prompt, "class_word": plan.class_word,
                   "mixed_precision": accelerator.mixed_precision, "num_processes": accelerator.num_processes,
                   "trainable_parameters": trainable_parameters, "images": sources, "command": sys.argv,
                   "versions": package_versions()}, plan.out_dir / RUN_FILE)
    accelerator.wait_for_everyone()

    started = time.perf_counter()
    data = build_data(config, plan, instance, classes, models, accelerator.device, accelerator.is_main_process)
    if class_warning:
        data.warnings.append(class_warning)
        log(f"warning: {class_warning}")
    log(_summary(plan, instance, classes, data, trainable_parameters, accelerator, time.perf_counter() - started))

    model = models.model
    optimizer = make_optimizer(models, cfg)
    scheduler = get_scheduler(SCHEDULERS[cfg.lr_scheduler], optimizer, num_warmup_steps=int(cfg.warmup_steps),
                              num_training_steps=int(cfg.train_step))
    model.train()
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped: JointNoisePredictor = accelerator.unwrap_model(model)
    params = [p for p in model.parameters() if p.requires_grad]

    checkpoint_state = {"recipe": recipe, "images": [s["sha256"] for s in sources]}
    start_step = 0
    if plan.resume_from is not None:
        start_step = _resume(plan, unwrapped, optimizer, scheduler, accelerator.scaler, checkpoint_state)
        if start_step == cfg.train_step and plan.finished:
            log(f"{plan.out_dir} is already trained to step {start_step}: nothing to do")
            return None
        log(f"resuming from {plan.resume_from} (step {start_step})")

    run_log = RunLog(plan.out_dir, accelerator.is_main_process, start_step)
    batches = BatchMaker(data, cfg, models.autoencoder, seed, accelerator.process_index)
    validation = Validation(config, plan, unwrapped, models.autoencoder, weight_dtype, data, run_log, accelerator)
    try:
        if start_step == 0:
            validation(0)
        bar = tqdm(range(start_step + 1, int(cfg.train_step) + 1), initial=start_step, total=int(cfg.train_step),
                   desc=f"train {plan.out_dir.name}", unit="step", disable=not accelerator.is_main_process)
        for step in bar:
            torch.manual_seed(sample_generator(seed, step, accelerator.process_index, STREAM_DROPOUT).initial_seed())
            batch = batches(step)
            with autocast(accelerator.device, weight_dtype):
                terms = loss_terms(model, batch, accelerator.device)
                loss = total_loss(terms, cfg)
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            logs: dict[str, float] = {}
            if step % cfg.log_every == 0 or step == cfg.train_step:
                logs = _step_logs(accelerator, loss, terms, scheduler, grad_norm, time.perf_counter() - started)
                run_log.write(step, logs)
                bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
            if accelerator.is_main_process and (step % cfg.checkpointing_steps == 0 or
                                                (step == cfg.train_step and cfg.keep_checkpoints)):
                save_checkpoint(plan.out_dir, step, unwrapped, optimizer, scheduler, accelerator.scaler,
                                checkpoint_state, int(cfg.checkpoints_total_limit))
            if step != cfg.train_step and cfg.validation_steps and step % cfg.validation_steps == 0:
                validation(step)
            if on_step is not None:
                on_step(step, logs)
        bar.close()
        validation(int(cfg.train_step))
    finally:
        run_log.close()

    files: list[Path] = []
    if accelerator.is_main_process:
        meta = _personalization_meta(config, plan, models, trainable_parameters, recipe, data)
        files = save_personalization(plan.out_dir, meta, unwrapped.nnet, unwrapped.text_encoder)
        if not cfg.keep_checkpoints:
            remove_checkpoints(plan.out_dir)
        size = sum(f.stat().st_size for f in files) / 2**20
        log(f"wrote {plan.out_dir}: {', '.join(f.name for f in files)} ({size:.1f} MiB); "
            f"{trainable_parameters:,} trained parameters; {time.perf_counter() - started:.0f}s")
    accelerator.wait_for_everyone()
    return TrainResult(plan.out_dir, int(cfg.train_step), trainable_parameters, files)


def _resume(plan: Plan, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
            checkpoint_state: dict[str, Any]) -> int:
    """Load the checkpoint if it was made with the same recipe and images; returns its step."""
    saved = load_checkpoint(plan.resume_from, model, optimizer, scheduler, scaler)
    changed = recipe_differences(saved.get("recipe", {}), checkpoint_state["recipe"])
    if changed:
        raise TrainingError(f"{plan.resume_from} was trained with other settings: {'; '.join(changed)}; "
                            "resume with the same settings or pass --overwrite to start over")
    if saved.get("images") != checkpoint_state["images"]:
        raise TrainingError(f"the photos or class images changed since {plan.resume_from} was written; "
                            "pass --overwrite to start over with the new ones")
    step = int(saved["step"])
    if step > plan.train.train_step:
        raise TrainingError(f"{plan.resume_from} is at step {step}, beyond --train_step {plan.train.train_step}")
    return step


def _step_logs(accelerator: Any, loss: Tensor, terms: dict[str, Tensor], scheduler: Any, grad_norm: Tensor | None,
               elapsed: float) -> dict[str, float]:
    """Loss and its terms averaged over the processes, learning rates, gradient norm, time."""
    reduced = accelerator.reduce(torch.stack([loss.detach(), *(t.detach() for t in terms.values())]), "mean")
    logs = {"loss": reduced[0].item(), **{f"loss_{k}": v.item() for k, v in zip(terms, reduced[1:])}}
    lrs = scheduler.get_last_lr()
    logs["lr"] = lrs[0]
    if len(lrs) > 1:
        logs["text_lr"] = lrs[-1]
    if grad_norm is not None:
        logs["grad_norm"] = float(grad_norm)
    logs["elapsed_s"] = round(elapsed, 2)
    return logs


def _recipe(config: ml_collections.ConfigDict, plan: Plan) -> dict[str, Any]:
    """The settings that define the result (train block + resolution, seed and the resolved words)."""
    return _plain({**config.train.to_dict(), "resolution": config.resolution, "seed": config.seed,
                   "data_type": config.data_type, "class_word": plan.class_word, "initializer_token": plan.initializer,
                   "instance_prompt": plan.instance_prompt, "nnet": str(config.paths.nnet)})


def _prepare_output(out: Path, overwrite: bool) -> None:
    """Create the folder; with --overwrite first remove what an earlier run wrote there (by name, nothing else)."""
    if overwrite and out.is_dir():
        for name in OUTPUT_FILES:
            (out / name).unlink(missing_ok=True)
        (out / LOG_DIR / LOG_FILE).unlink(missing_ok=True)
        shutil.rmtree(out / LOG_DIR / TENSORBOARD_DIR, ignore_errors=True)
        for old in (out / VALIDATION_DIR).glob("step-*.jpg"):
            old.unlink()
        remove_checkpoints(out)
    out.mkdir(parents=True, exist_ok=True)


def remove_checkpoints(out: Path) -> None:
    """Delete our checkpoint folders (and the checkpoints folder when that leaves it empty)."""
    folder = out / CHECKPOINT_DIR
    for checkpoint in list_checkpoints(out) + list(folder.glob(f".{CHECKPOINT_PREFIX}*.tmp")):
        shutil.rmtree(checkpoint)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def _summary(plan: Plan, instance: list[TrainImage], classes: list[TrainImage] | None, data: TrainData,
             trainable: int, accelerator: Any, seconds: float) -> str:
    cfg = plan.train
    crops = Counter(image.crop for image in instance)
    lines = [f"subject: {len(instance)} photos from {plan.data_dir} "
             f"({', '.join(f'{n} {c}' for c, n in crops.items())}), {len(data.instance)} views; "
             f"class word {plan.class_word!r}; prompt {plan.instance_prompt!r}"]
    if classes:
        lines.append(f"prior preservation: {len(classes)} class images from {plan.class_dir}, "
                     f"weight {cfg.prior_loss_weight}")
    else:
        lines.append("prior preservation: off")
    lines.append(f"training: {trainable:,} parameters (U-ViT LoRA r={cfg.rank} on {len(cfg.lora_targets)} target "
                 f"kinds, text encoder {cfg.text_encoder_mode}); {cfg.train_step} steps x "
                 f"({cfg.batch_size}{f' + {cfg.class_batch_size}' if classes else ''}) x "
                 f"{accelerator.num_processes} process(es); {accelerator.mixed_precision} on {accelerator.device}; "
                 f"images encoded in {seconds:.1f}s")
    return "\n".join(lines)


def _personalization_meta(config: ml_collections.ConfigDict, plan: Plan, models: Models, trainable: int,
                          recipe: dict[str, Any], data: TrainData) -> dict[str, Any]:
    cfg = config.train
    nnet_path = Path(config.paths.nnet)
    meta = {
        "modifier_token": plan.token,
        "initializer_token": plan.initializer if plan.token else None,
        "num_vectors": int(cfg.num_vectors) if plan.token else 0,
        "class_word": plan.class_word,
        "instance_prompt": plan.instance_prompt,
        "text_encoder_mode": cfg.text_encoder_mode,
        "uvit_lora": models.uvit_spec.to_dict(),
        "uvit_lora_targets": list(cfg.lora_targets),
        "base_checkpoint": {"file": nnet_path.name, "sha256": cached_sha256(nnet_path)},
        "trainable_parameters": trainable,
        "steps": int(cfg.train_step),
        "recipe": recipe,
        "warnings": data.warnings,
    }
    if models.text_spec is not None:
        meta["text_lora"] = models.text_spec.to_dict()
    return meta


@dataclass
class TrainingPipeline(T2IPipeline):
    """The sampling pipeline on the models being trained: autocast in the training's weight dtype (the
    frozen weights are in it), where sample.py would pick fp16 on CUDA and fp32 elsewhere."""

    weight_dtype: torch.dtype = torch.float32

    @property
    def dtype(self) -> torch.dtype:
        return self.weight_dtype


class Validation:
    """Fixed-noise loss on the photos and fixed-seed images for a few prompts (main process only)."""

    def __init__(self, config: ml_collections.ConfigDict, plan: Plan, model: JointNoisePredictor,
                 autoencoder: nn.Module, weight_dtype: torch.dtype, data: TrainData, run_log: RunLog, accelerator: Any):
        self.config, self.plan, self.model, self.autoencoder = config, plan, model, autoencoder
        self.weight_dtype = weight_dtype
        self.data, self.run_log, self.accelerator = data, run_log, accelerator
        cfg = config.train
        self.prompts = [rewrite_prompt(fill_prompt(p, None, plan.class_word), plan.token, [plan.class_word])
                        for p in cfg.validation_prompts] if cfg.validation_steps else []
        self.seeds = [int(config.seed) + i for i in range(len(self.prompts))]
        self._pipeline: T2IPipeline | None = None

    def __call__(self, step: int) -> None:
        accelerator = self.accelerator
        if accelerator.is_main_process:
            with autocast(accelerator.device, self.weight_dtype):
                losses = fixed_noise_loss(self.model, self.data, self.autoencoder, int(self.config.seed),
                                          accelerator.device, int(self.config.train.encode_batch_size))
            self.run_log.write(step, losses)
            accelerator.print(f"step {step}: fixed-noise loss {losses['eval_loss_instance']:.4f} (instance image), "
                              f"{losses['eval_loss_clip_img']:.4f} (clip_img)")
            if self.prompts:
                self._images(step)
        accelerator.wait_for_everyone()

    def _images(self, step: int) -> None:
        model = self.model
        was_training = model.training
        model.eval()
        with autocast(self.accelerator.device, self.weight_dtype):
            if self._pipeline is None:
                with torch.no_grad():
                    empty = model.encode_text(model.text_encoder.tokenize([""]).to(self.accelerator.device))[0]
                self._pipeline = TrainingPipeline(
                    config=self.config, nnet=model.nnet, autoencoder=self.autoencoder, text_encoder=model.text_encoder,
                    caption_decoder=model.caption_prefix, device=self.accelerator.device, personalization=None,
                    finetuned_parameters=None, empty_text=empty, weight_dtype=self.weight_dtype)
            images = self._pipeline.generate_images(self.prompts, self.seeds)
        model.train(was_training)
        grid = image_grid([images], cell=256)
        path = self.plan.out_dir / VALIDATION_DIR / f"step-{step:06d}.jpg"
        with atomic_path(path) as tmp:
            grid.save(tmp, format="JPEG", quality=90)
        self.run_log.image("validation", grid, step)
        if step == 0:
            self.run_log.write(step, {"validation_prompts": self.prompts, "validation_seeds": self.seeds})
