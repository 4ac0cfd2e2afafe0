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
    recipes.py      the documented recipes the search tries (RECIPES)
    auto_recipe.py  run_auto_recipe(): a budgeted search over documented recipes, best by objective - penalty
    search_devices.py  the parallel search's recipe processes (--auto_devices): failures, stop, resume

The names below are imported from their module on first use (PEP 562), so that importing a light module of
the package (recipes.py for train.py's flags) does not load torch, peft and diffusers with the rest.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "batches": ("Batch", "BatchMaker", "ViewSampler", "loss_terms", "noisy_batch", "total_loss"),
    "checkpoints": ("RESUMABLE_CHANGES", "load_checkpoint", "recipe_differences", "save_checkpoint"),
    "encodings": ("ImageEncoder", "LatentSource", "TrainData", "build_data", "describe_sources", "vae_pixels"),
    "images": ("CROP_MODES", "TrainImage", "load_class_images", "load_instance_images", "square_crop"),
    "loop": ("TrainResult", "train"),
    "model": ("JointNoisePredictor", "Models", "build_models", "count_trainable"),
    "optim": ("SCHEDULERS", "make_optimizer", "make_scheduler"),
    "plan": ("Plan", "TrainingError", "make_plan"),
    "logs": ("RunLog",),
    "validation": ("fixed_noise_loss",),
    "metrics": ("MetricScorer", "ScoreFn", "ValidationScores"),
    "validation_set": ("Rendered", "ValidationSet"),
    "selection": ("METRICS", "Objective", "Selection"),
    "recipes": ("RECIPES",),
    "auto_recipe": ("run_auto_recipe",),
}
"""module of libs/train -> the public names the package gives from it"""
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = list(_MODULE_OF)


def __getattr__(name: str) -> Any:
    """A public name, imported from its module the first time it is asked for."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
