"""The optimizer and its learning-rate schedule: AdamW over the trained tensors only, with the U-ViT
LoRA and the text side at their own learning rates, and a warmup then a constant, cosine or linear
schedule."""
from __future__ import annotations

from typing import Any, Sequence

import ml_collections
import torch
from torch import nn

from libs.config import KEY_CHOICES

# config name (libs.config.KEY_CHOICES, in order) -> transformers.get_scheduler name; every schedule starts
# with `warmup_steps` of warmup
SCHEDULERS = dict(zip(KEY_CHOICES["train.lr_scheduler"], ("constant_with_warmup", "cosine", "linear"), strict=True))


def make_optimizer(trainable: Sequence[tuple[str, nn.Parameter]], cfg: ml_collections.ConfigDict,
                   fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW over the (name, parameter) pairs that train: U-ViT LoRA at `lr`; the text side at `text_lr`,
    the token rows without weight decay (decay would pull an embedding out of the vocabulary's range).

    `fused` (default: when every trained tensor is on a CUDA device): one kernel per step for all of them
    instead of a chain of multi-tensor ops. The state it keeps is the same, so checkpoints resume either way."""
    groups: dict[str, dict[str, Any]] = {
        "uvit": {"params": [], "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        "token": {"params": [], "lr": cfg.text_lr, "weight_decay": 0.0},
        "text": {"params": [], "lr": cfg.text_lr, "weight_decay": cfg.weight_decay},
    }
    for name, param in trainable:
        key = "uvit" if name.startswith("nnet.") else "token" if name.endswith("extra_weight") else "text"
        groups[key]["params"].append(param)
    if fused is None:
        fused = bool(trainable) and all(param.device.type == "cuda" for _, param in trainable)
    return torch.optim.AdamW([g for g in groups.values() if g["params"]], betas=(0.9, 0.999), eps=1e-8,
                             fused=fused or None)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: ml_collections.ConfigDict) -> Any:
    """The learning-rate schedule `cfg.lr_scheduler` over `cfg.train_step` steps."""
    from transformers import get_scheduler

    return get_scheduler(SCHEDULERS[cfg.lr_scheduler], optimizer, num_warmup_steps=int(cfg.warmup_steps),
                         num_training_steps=int(cfg.train_step))
