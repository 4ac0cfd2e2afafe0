"""Personalization training, one module per concept; libs/train/loop.py reads top to bottom as the recipe.

    plan.py         the request checked and resolved before anything is written (TrainingError, Plan)
    images.py       photos and class images -> square training crops (face-aware framing)
    encodings.py    every view encoded once by the frozen VAE / CLIP image tower; the prompts' text inputs
    model.py        the U-ViT + text path as one module, LoRA and token added, what trains
    optim.py        AdamW over the trained tensors and the learning-rate schedule
    batches.py      one step's noisy batch and the joint loss (spec §5)
    checkpoints.py  checkpoints to resume exactly
    records.py      train_config.json and the personalization's meta record
    logs.py         the JSONL / TensorBoard log and a step's log line
    summary.py      the lines printed before the first step
    run_report.py   <out>/report.html: settings, photos, curves, the selection table, validation images, warnings
    search_report.py <out>/auto_recipe/report.html: the recipe table, the frontier plot, the winner
    validation_set.py  the validation set (sim/edit prompts, fixed generators) and a step's rendered images
    metrics.py      the competition metric on it (libs/score/scorer.py)
    selection.py    the objective and the best validated step's adapters (candidates on disk)
    curves.py       the validation curves as a PNG
    validation.py   fixed-noise loss, and the validation images rendered, scored and logged during training
    loop.py         train(): the recipe
    auto_recipe.py  run_auto_recipe(): a budgeted search over documented recipes, best by objective - penalty
    search_devices.py  the parallel search's recipe processes (--auto_devices): failures, stop, resume
"""
from libs.train.batches import Batch, BatchMaker, ViewSampler, loss_terms, noisy_batch, total_loss
from libs.train.checkpoints import RESUMABLE_CHANGES, load_checkpoint, recipe_differences, save_checkpoint
from libs.train.encodings import ImageEncoder, LatentSource, TrainData, build_data, describe_sources, vae_pixels
from libs.train.images import (CROP_MODES, TrainImage, load_class_images, load_instance_images, square_crop)
from libs.train.loop import TrainResult, train
from libs.train.model import JointNoisePredictor, Models, build_models, count_trainable
from libs.train.optim import SCHEDULERS, make_optimizer, make_scheduler
from libs.train.plan import Plan, TrainingError, make_plan
from libs.train.logs import RunLog
from libs.train.validation import fixed_noise_loss
from libs.train.metrics import MetricScorer, ScoreFn, ValidationScores
from libs.train.validation_set import Rendered, ValidationSet
from libs.train.selection import METRICS, Objective, Selection
from libs.train.auto_recipe import RECIPES, run_auto_recipe

__all__ = [
    "Batch", "BatchMaker", "ViewSampler", "loss_terms", "noisy_batch", "total_loss",
    "RESUMABLE_CHANGES", "load_checkpoint", "recipe_differences", "save_checkpoint",
    "ImageEncoder", "LatentSource", "TrainData", "build_data", "describe_sources", "vae_pixels",
    "CROP_MODES", "TrainImage", "load_class_images", "load_instance_images", "square_crop",
    "TrainResult", "train",
    "JointNoisePredictor", "Models", "build_models", "count_trainable",
    "SCHEDULERS", "make_optimizer", "make_scheduler",
    "Plan", "TrainingError", "make_plan",
    "RunLog",
    "fixed_noise_loss",
    "MetricScorer", "Rendered", "ScoreFn", "ValidationScores", "ValidationSet",
    "METRICS", "Objective", "Selection",
    "RECIPES", "run_auto_recipe",
]
