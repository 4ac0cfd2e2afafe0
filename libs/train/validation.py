"""Progress checks during training (main process only).

Every validation (step 0, every `validation_steps`, the last step): the fixed-noise loss on the photos (a
smooth signal where the training loss jumps with its random timesteps). With `validation_steps`, after
step 0 (the base model is no candidate and costs a render), also the competition metric (libs/train/metrics.py):
the validation set rendered in batches with the sampler sample.py uses (fewer solver steps:
`validation_sample_steps`), written in the competition's layout, scored, logged (JSONL + TensorBoard),
drawn as a grid per step and handed to the best-step selection (libs/train/selection.py). The curves
(libs/train/curves.py) are drawn from the log after each such validation, and the run report
(libs/train/run_report.py) is refreshed after every validation.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import nn

from libs.diffusion import alphas_cumprod, keyed_generator
from libs.grids import image_grid
from libs.photos import open_image
from libs.precision import autocast
from libs.sample.files import save_jpeg
from libs.train import run_report
from libs.sample.pipeline import T2IPipeline
from libs.layout import ADVANCED_SPLITS
from libs.train.batches import STREAM_EVAL, Batch, loss_terms, noisy_batch
from libs.train.curves import plot_curves
from libs.train.encodings import TrainData
from libs.train.metrics import ScoreFn
from libs.train.validation_set import Rendered, ValidationSet
from libs.train.model import JointNoisePredictor
from libs.train.plan import Plan
from libs.train.logs import RunLog
from libs.train.selection import Selection
from libs.train_output import CURVES_FILE, VALIDATION_DIR, validation_grid, validation_step_dir

EVAL_TIMESTEPS = (100, 300, 500, 700, 900)  # the fixed-noise loss: one pass per timestep over the photos
GRID_CELL = 256


@torch.no_grad()
def fixed_noise_loss(model: JointNoisePredictor, data: TrainData, autoencoder: nn.Module, seed: int,
                     device: torch.device, batch_size: int) -> dict[str, float]:
    """Instance-photo losses at fixed timesteps and fixed noise: a smooth progress signal (the training
    loss jumps with the random timesteps). Plain MSE: no mask, no min-SNR weights, so recipes compare."""
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
    """Called at step 0, every `validation_steps` and at the last step (main process works, the others wait)."""

    def __init__(self, plan: Plan, model: JointNoisePredictor, autoencoder: nn.Module, weight_dtype: torch.dtype,
                 data: TrainData, run_log: RunLog, accelerator: Any, score_fn: ScoreFn | None, selection: Selection):
        config = plan.config
        self.config, self.plan, self.model, self.autoencoder = config, plan, model, autoencoder
        self.weight_dtype = weight_dtype
        self.data, self.run_log, self.accelerator = data, run_log, accelerator
        self.score_fn, self.selection = score_fn, selection
        self.metric = bool(config.train.validation_steps) and score_fn is not None
        self.validation_set = ValidationSet.from_config(config, plan.data_dir.name, plan.token, plan.class_word)
        self.folder = plan.out_dir / VALIDATION_DIR

    def __call__(self, step: int) -> None:
        accelerator = self.accelerator
        if accelerator.is_main_process:
            with autocast(accelerator.device, self.weight_dtype):
                record: dict[str, Any] = fixed_noise_loss(self.model, self.data, self.autoencoder, int(self.config.seed),
                                                          accelerator.device, int(self.config.train.encode_batch_size))
            line = (f"step {step}: fixed-noise loss {record['eval_loss_instance']:.4f} (instance image), "
                    f"{record['eval_loss_clip_img']:.4f} (clip_img)")
            if self.metric and step > 0:
                record.update(self._judge(step))
                line += (f"; sim face {record['sim_face']:.3f} CLIP-I {record['sim_clip_img']:.3f} | edit face "
                         f"{record['edit_face']:.3f} CLIP-I {record['edit_clip_img']:.3f} CLIP-T "
                         f"{record['edit_clip_text']:.3f} | objective {record['objective']:.4f}"
                         f"{' (best so far)' if self.selection.best == step else ''}")
            self.run_log.write(step, record)
            accelerator.print(line)
            if self.metric and step > 0:
                plot_curves(self.run_log.path, self.folder / CURVES_FILE, self.selection.best,
                            str(self.selection.used_objective))
            run_report.write_run_report(self.plan.out_dir, running=self.selection)  # watchable while the run goes on
        accelerator.wait_for_everyone()

    def _judge(self, step: int) -> dict[str, Any]:
        """Render, write and score the validation set; tell the selection. Returns the log entries."""
        started = time.perf_counter()
        rendered = self.render(step)
        rendered_at = time.perf_counter()
        scores = self.score_fn(rendered)
        objective = self.selection.record(step, scores.values, scores.face_backend, scores.face_usable)
        self.selection.offer(step, self.model)
        return {**scores.values, "objective": objective, "face_backend": scores.face_backend,
                "validation_render_s": round(rendered_at - started, 3),
                "validation_score_s": round(time.perf_counter() - rendered_at, 3)}

    def render(self, step: int) -> Rendered:
        """The validation set's images at this step, written as `validation/step-<step>/<name>_<split>/*.jpg`
        (and a grid `validation/step-<step>.jpg`), returned as decoded from the files."""
        vset, cfg = self.validation_set, self.config.train
        items = vset.items()
        model = self.model
        was_training = model.training
        model.eval()
        images: list[Image.Image] = []
        with autocast(self.accelerator.device, self.weight_dtype):
            pipeline = self._pipeline()
            size = int(cfg.validation_batch_size)
            for start in range(0, len(items), size):
                chunk = items[start:start + size]
                images += pipeline.generate([item.sampled for item in chunk], [vset.generator(item) for item in chunk],
                                            steps=int(cfg.validation_sample_steps))
        model.train(was_training)
        vset.write_prompt_files(self.folder)
        step_dir = validation_step_dir(self.plan.out_dir, step)
        decoded: dict[str, list[list[Image.Image]]] = {
            split: [[] for _ in vset.prompts[split]] for split in ADVANCED_SPLITS}
        for item, image in zip(items, images):
            path = vset.image_path(step_dir, item)
            save_jpeg(image, path)
            decoded[item.split][item.index].append(open_image(path))
        rows = [[image for prompt in decoded[split] for image in prompt] for split in ADVANCED_SPLITS]
        grid = image_grid(rows, cell=GRID_CELL, labels=list(ADVANCED_SPLITS))
        save_jpeg(grid, validation_grid(self.plan.out_dir, step))
        self.run_log.image("validation", grid, step)
        return Rendered(step, self.plan.data_dir, step_dir, vset, decoded)

    def _pipeline(self) -> T2IPipeline:
        """The sampler on the models as they are now: the empty prompt's encoding (`empty_token` guidance)
        is taken afresh, since a trained text encoder changes it from one validation to the next."""
        model = self.model
        with torch.no_grad():
            empty = model.encode_text(model.text_encoder.tokenize([""]).to(self.accelerator.device))[0]
        return TrainingPipeline(
            config=self.config, nnet=model.nnet, autoencoder=self.autoencoder, text_encoder=model.text_encoder,
            caption_decoder=model.caption_prefix, device=self.accelerator.device, personalization=None,
            finetuned_parameters=None, empty_text=empty, weight_dtype=self.weight_dtype)
