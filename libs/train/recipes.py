"""The recipes `--auto_recipe` tries (libs/train/auto_recipe.py), each a few changes of `config.train`. Kept
apart from the search and importing nothing heavy: train.py's `--auto_recipes` choices come from here, so its
argument parsing and `--help` load no torch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import ml_collections


@dataclass(frozen=True)
class Recipe:
    name: str
    what: str
    changes: Callable[[ml_collections.ConfigDict], dict[str, Any]]  # config.train -> the keys it sets


RECIPES = (
    Recipe("base", "the config as given", lambda cfg: {}),
    Recipe("half_rank", "U-ViT LoRA rank and alpha halved: half the changed parameters, the same update scale",
           lambda cfg: {"rank": max(1, int(cfg.rank) // 2), "alpha": float(cfg.alpha) / 2}),
    Recipe("double_lr", "both learning rates doubled: the identity comes sooner (the step selection stops "
           "before editability goes)", lambda cfg: {"lr": 2 * cfg.lr, "text_lr": 2 * cfg.text_lr}),
    Recipe("identity_levers", "masked loss on the person masks (tools/crop.py) and min-SNR gamma 5",
           lambda cfg: {"masked_loss": True, "min_snr_gamma": 5.0}),
    Recipe("text_lora", "a LoRA on the CLIP text encoder besides the token", lambda cfg: {"text_encoder_mode": "lora"}),
    Recipe("longer", "1.5x the steps: more validated steps for a subject that learns slowly",
           lambda cfg: {"train_step": round(1.5 * int(cfg.train_step))}),
    # the parameter axis: fewer changed parameters at (hopefully) the same identity
    Recipe("low_rank", "U-ViT LoRA at an eighth of the rank (alpha scaled alike): an eighth of the changed parameters",
           lambda cfg: {"adapter": "lora", "rank": max(1, int(cfg.rank) // 8), "alpha": float(cfg.alpha) / 8}),
    Recipe("vera", "VeRA on the same targets: only per-layer scaling vectors train (rank + output size per "
           "layer), the shared projections are seeded", lambda cfg: {"adapter": "vera"}),
    Recipe("lokr", "LoKr (Kronecker product) at the config's rank on the same targets", lambda cfg: {"adapter": "lokr"}),
    Recipe("text_only", "no U-ViT adapter: the token and a LoRA on the CLIP text encoder carry the identity",
           lambda cfg: {"adapter": "none", "text_encoder_mode": "lora"}),
)
RECIPE_NAMES = tuple(recipe.name for recipe in RECIPES)
