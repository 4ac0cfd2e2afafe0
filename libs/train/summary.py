"""The lines printed before the first step: the subject, prior preservation, what trains and how, the
loss switches and the validation plan."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import ml_collections

from libs.adapters.families import AdapterSpec
from libs.train.images import TrainImage
from libs.train.plan import Plan


def start_summary(plan: Plan, instance: list[TrainImage], classes: list[TrainImage] | None, instance_views: int,
                  trainable: int, uvit_spec: AdapterSpec | None, accelerator: Any, seconds: float) -> str:
    """The lines printed before the first step: the subject, prior preservation, what trains and how."""
    cfg = plan.train
    crops = Counter(image.crop for image in instance)
    lines = [f"subject: {len(instance)} photos from {plan.data_dir} "
             f"({', '.join(f'{n} {c}' for c, n in crops.items())}), {instance_views} views; "
             f"class word {plan.class_word!r}; prompt {plan.instance_prompt!r}"]
    if classes:
        lines.append(f"prior preservation: {len(classes)} class images from {plan.class_dir}, "
                     f"weight {cfg.prior_loss_weight}")
    else:
        lines.append("prior preservation: off")
    adapter = uvit_spec.describe() if uvit_spec is not None else "no U-ViT adapter"
    lines.append(f"training: {trainable:,} parameters ({adapter}, text encoder {cfg.text_encoder_mode}); "
                 f"{cfg.train_step} steps x "
                 f"({cfg.batch_size}{f' + {cfg.class_batch_size}' if classes else ''}) x "
                 f"{accelerator.num_processes} process(es); {accelerator.mixed_precision} on {accelerator.device}; "
                 f"images encoded in {seconds:.1f}s")
    lines.append(f"loss: {loss_summary(cfg, instance, plan.data_dir)}")
    if cfg.validation_steps:
        images = (len(cfg.validation_sim_prompts) + len(cfg.validation_edit_prompts)) * cfg.validation_images
        lines.append(f"validation: {images} images ({len(cfg.validation_sim_prompts)} sim + "
                     f"{len(cfg.validation_edit_prompts)} edit prompts x {cfg.validation_images}, "
                     f"{cfg.validation_sample_steps} solver steps) every {cfg.validation_steps} steps and "
                     f"at the last, scored against the photos in {plan.data_dir}; adapters written: "
                     + (f"the best step by {cfg.objective}" if cfg.selection == "best" else "the last step's"))
    else:
        lines.append("validation: fixed-noise loss only (validation_steps 0); adapters written: the last step's")
    return "\n".join(lines)


def loss_summary(cfg: ml_collections.ConfigDict, instance: list[TrainImage], data_dir: Path) -> str:
    """The loss switches in words, and which photos the masked loss reaches."""
    parts = ["plain MSE"]
    if cfg.masked_loss:
        masked = sum(image.mask is not None for image in instance)
        if masked == 0:
            parts = [f"masked loss on, but no person masks in {data_dir} (no crops.json with masks: run "
                     "tools/crop.py with background removal): plain MSE for every photo"]
        else:
            parts = [f"person-mask-weighted MSE for {masked} of {len(instance)} photos (background weight "
                     f"{cfg.mask_background_weight})" + (", plain MSE for the others" if masked < len(instance) else "")]
    if cfg.min_snr_gamma > 0:
        parts.append(f"min-SNR weights, gamma {cfg.min_snr_gamma}")
    return "; ".join(parts)
