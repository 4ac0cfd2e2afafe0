"""What a run writes about itself: train_config.json, the JSONL and TensorBoard logs, the start-of-run
summary and the personalization's meta record (the folder's names are libs/train_output.py's)."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from libs.files import atomic_path, cached_sha256, save_json
from libs.config import REPO_ROOT
from libs.train.images import TrainImage
from libs.train.model import Models
from libs.train.plan import Plan
from libs.train_output import LOG_DIR, LOG_FILE, RUN_FILE, TENSORBOARD_DIR

PACKAGES = ("torch", "transformers", "peft", "accelerate", "safetensors", "numpy", "pillow", "ml_collections")


def write_run_file(plan: Plan, accelerator: Any, trainable: int, sources: list[dict[str, str]]) -> None:
    """train_config.json: how this run was started, enough to repeat it."""
    save_json({"config": plan.config.to_dict(), "data_dir": str(plan.data_dir), "class_dir": str(plan.class_dir),
               "instance_prompt": plan.instance_prompt, "class_word": plan.class_word,
               "mixed_precision": accelerator.mixed_precision, "num_processes": accelerator.num_processes,
               "device": str(accelerator.device),
               "trainable_parameters": trainable, "images": sources, "command": sys.argv,
               "versions": package_versions()}, plan.out_dir / RUN_FILE)


def read_run_file(out: Path) -> dict[str, Any] | None:
    """train_config.json of a run folder; None when there is none or it is not a JSON object."""
    try:
        data = json.loads((Path(out) / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_log(out: Path) -> list[dict[str, Any]]:
    """The log lines of a run folder in order (training lines and validation lines share a step); a line
    that is not a JSON object with a step (a run killed mid-write) is left out."""
    path = Path(out) / LOG_DIR / LOG_FILE
    if not path.is_file():
        return []
    lines = []
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(text)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            lines.append(record)
    return lines


def package_versions() -> dict[str, str]:
    """Python, platform, the packages that shape a result, and the git commit of this code."""
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
            self.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def step_logs(accelerator: Any, loss: Tensor, terms: dict[str, Tensor], scheduler: Any, grad_norm: Tensor | None,
              elapsed: float) -> dict[str, float]:
    """A step's log line: loss and its terms averaged over the processes, learning rates, gradient norm, time."""
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


def start_summary(plan: Plan, instance: list[TrainImage], classes: list[TrainImage] | None, instance_views: int,
                  trainable: int, accelerator: Any, seconds: float) -> str:
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
    lines.append(f"training: {trainable:,} parameters (U-ViT LoRA r={cfg.rank} on {len(cfg.lora_targets)} target "
                 f"kinds, text encoder {cfg.text_encoder_mode}); {cfg.train_step} steps x "
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


def personalization_meta(config: ml_collections.ConfigDict, plan: Plan, models: Models, trainable: int,
                         warnings: list[str], selection: dict[str, Any]) -> dict[str, Any]:
    """personalization.json's record of what was trained (sample.py rebuilds the adapters from it): `steps`
    is the chosen step (the adapters' optimizer steps), `selection` how it was chosen and every step's scores."""
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
        "steps": int(selection["chosen_step"]),
        "trained_steps": int(cfg.train_step),
        "selection": selection,
        "recipe": plan.recipe(),
        "warnings": warnings,
    }
    if models.text_spec is not None:
        meta["text_lora"] = models.text_spec.to_dict()
    return meta
