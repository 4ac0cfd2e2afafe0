"""Training checkpoints: everything a run needs to continue exactly where it stopped.

    <out>/checkpoints/checkpoint-000300/
        trainable.safetensors   the trained tensors (LoRA, token rows, text-encoder weights)
        optimizer.pt            optimizer, learning-rate scheduler and loss-scaler state
        training_state.json     the step, the recipe and the photos' hashes

A checkpoint is written to a hidden temporary folder and renamed into place, so a listed checkpoint is
always complete. A run resumes only with the recipe it was written with, apart from RESUMABLE_CHANGES.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from libs.checkpoint import (CheckpointError, key_mismatches, load_safetensors, safe_torch_load, save_json,
                             save_safetensors, save_torch)

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_STATE = "training_state.json"
CHECKPOINT_WEIGHTS = "trainable.safetensors"
CHECKPOINT_OPTIMIZER = "optimizer.pt"
# keys that may change when a run is resumed: they do not change what a step computes (nor how a validated
# step is scored and chosen: the validation set, face backend, selection and objective stay as recorded)
RESUMABLE_CHANGES = ("train_step", "log_every", "checkpointing_steps", "checkpoints_total_limit", "keep_checkpoints",
                     "validation_steps", "validation_batch_size", "cache_latents", "cache_dir", "encode_batch_size",
                     "gradient_checkpointing", "compile", "auto_recipe", "auto_recipes", "auto_budget",
                     "auto_param_penalty")


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints (they are renamed into place only when fully written), oldest first."""
    folder = Path(out_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and (p / CHECKPOINT_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: Any, state: dict[str, Any], keep: int) -> Path:
    """Trainable tensors, optimizer/scheduler/loss-scaler state and the recipe, written to a temporary
    folder and renamed into place; then all but the newest `keep` checkpoints are removed. A write that
    fails (a full disk) removes its temporary folder and says which checkpoint a resume would use."""
    folder = out_dir / CHECKPOINT_DIR
    final = folder / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = folder / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_safetensors({n: p for n, p in model.named_parameters() if p.requires_grad}, tmp / CHECKPOINT_WEIGHTS)
        save_torch({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None}, tmp / CHECKPOINT_OPTIMIZER)
        save_json({**state, "step": step}, tmp / CHECKPOINT_STATE)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(out_dir)
        resume = (f"`--resume latest` continues from {previous[-1].name}" if previous
                  else "no earlier checkpoint exists: the run starts over")
        raise CheckpointError(f"cannot write the checkpoint of step {step} into {folder}: "
                              f"{error.strerror or error}; nothing of it was kept; free space, then {resume}") from error
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def read_checkpoint_state(path: Path) -> dict[str, Any]:
    """training_state.json of a checkpoint (step, recipe, images), checked before anything is loaded."""
    file = path / CHECKPOINT_STATE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"cannot read {file}: {error}; delete {path} to resume from the checkpoint "
                              "before it, or pass --overwrite to start over") from error
    if (not isinstance(state, dict) or not isinstance(state.get("step"), int) or state["step"] < 0
            or not isinstance(state.get("recipe"), dict)):
        raise CheckpointError(f"{file} is not a training state (it needs a step and a recipe); delete {path} to "
                              "resume from the checkpoint before it, or pass --overwrite to start over")
    return state


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    scaler: Any) -> dict[str, Any]:
    """Restore what save_checkpoint wrote (compare `read_checkpoint_state` first); returns its state."""
    state = read_checkpoint_state(path)
    weights = load_safetensors(path / CHECKPOINT_WEIGHTS, "checkpoint weights")
    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    problems = key_mismatches(own, weights)
    if problems:
        raise CheckpointError("\n".join([f"{path} does not fit this model: was it written with other LoRA targets "
                                         "or text-encoder mode?", *problems]))
    with torch.no_grad():
        for name, param in own.items():
            param.copy_(weights[name])
    rest = safe_torch_load(path / CHECKPOINT_OPTIMIZER, "optimizer state")
    try:
        optimizer.load_state_dict(rest["optimizer"])
        scheduler.load_state_dict(rest["scheduler"])
        if scaler is not None and rest["scaler"] is not None:
            scaler.load_state_dict(rest["scaler"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path / CHECKPOINT_OPTIMIZER} does not hold this run's optimizer state ({error}); "
                              f"delete {path} to resume from the checkpoint before it, or pass --overwrite") from error
    return state


def remove_checkpoints(out_dir: Path) -> None:
    """Delete our checkpoint folders (and the checkpoints folder when that leaves it empty)."""
    folder = out_dir / CHECKPOINT_DIR
    for checkpoint in list_checkpoints(out_dir) + list(folder.glob(f".{CHECKPOINT_PREFIX}*.tmp")):
        shutil.rmtree(checkpoint)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def recipe_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Settings that changed since the checkpoint and change what a step computes (compared as JSON
    stores them: a tuple and the list it was saved as are the same)."""
    saved, current = _as_json(saved), _as_json(current)
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(saved) | set(current))
            if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k)]


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=list))
