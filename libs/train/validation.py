"""Progress checks during training (main process only): the fixed-noise loss on the photos, a smooth
signal where the training loss jumps with its random timesteps, and fixed-seed images for a few
prompts, sampled from the models being trained with the sampler sample.py uses."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ml_collections
import torch
from torch import nn

from libs.checkpoint import atomic_path
from libs.diffusion import alphas_cumprod, keyed_generator
from libs.grids import image_grid
from libs.precision import autocast
from libs.prompts import fill_prompt, rewrite_prompt
from libs.sampling import T2IPipeline
from libs.train.batches import STREAM_EVAL, Batch, loss_terms, noisy_batch
from libs.train.encodings import TrainData
from libs.train.model import JointNoisePredictor
from libs.train.plan import Plan
from libs.train.records import VALIDATION_DIR, RunLog

EVAL_TIMESTEPS = (100, 300, 500, 700, 900)  # the fixed-noise loss: one pass per timestep over the photos


@torch.no_grad()
def fixed_noise_loss(model: JointNoisePredictor, data: TrainData, autoencoder: nn.Module, seed: int,
                     device: torch.device, batch_size: int) -> dict[str, float]:
    """Instance-photo losses at fixed timesteps and fixed noise: a smooth progress signal (the training
    loss jumps with the random timesteps)."""
    was_training = model.training
    model.eval()
    source = data.instance
    views = torch.arange(0, len(source), source.num_flips)
    generator = keyed_generator(seed, STREAM_EVAL)
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
