"""Training checkpoints: everything a run needs to continue exactly where it stopped.

    <out>/checkpoints/checkpoint-000300/
        trainable.safetensors   the trained tensors (LoRA, token rows, text-encoder weights)
        ema.safetensors         their moving average, with --ema_decay (libs/train/ema.py)
        optimizer.pt            optimizer, learning-rate scheduler and loss-scaler state
        training_state.json     the step, the recipe and the photos' hashes

A checkpoint is written to a hidden temporary folder and renamed into place, so a listed checkpoint is
always complete. A run resumes only with the recipe it was written with, apart from RESUMABLE_CHANGES.
The training loop writes them through `CheckpointWriter`, off its critical path.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from libs.files import (CheckpointError, key_mismatches, load_json, load_safetensors, safe_torch_load, save_json,
                             save_safetensors, save_torch)
from libs.train_output import (CHECKPOINT_DIR, CHECKPOINT_EMA, CHECKPOINT_OPTIMIZER, CHECKPOINT_STATE, CHECKPOINT_WEIGHTS,
                               checkpoint_path,
                               list_checkpoints)

# keys that may change when a run is resumed (a list of names, like loading.py's _LDM_ORDER: data, not a twin): they do not change what a step computes (nor how a validated
# step is scored and chosen: the validation set, face backend, selection and objective stay as recorded)
RESUMABLE_CHANGES = ("train_step", "log_every", "checkpointing_steps", "checkpoints_total_limit", "keep_checkpoints",
                     "validation_steps", "validation_batch_size", "cache_latents", "cache_dir", "encode_batch_size",
                     "gradient_checkpointing", "compile", "auto_recipe", "auto_recipes", "auto_budget",
                     "auto_param_penalty", "auto_max_parameters",
                     "auto_devices")


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors by parameter name (what a checkpoint's trainable.safetensors holds)."""
    return {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}


def load_trainable(model: nn.Module, path: Path, what: str = "trained tensors", hint: str = "") -> None:
    """Copy saved trained tensors back into the model (names and shapes must match `trainable_state` exactly)."""
    saved = load_safetensors(path, what)
    own = trainable_state(model)
    problems = key_mismatches(own, saved)
    if problems:
        raise CheckpointError("\n".join([f"{path} does not fit this model" + (f" ({hint})" if hint else ""),
                                         *problems]))
    with torch.no_grad():
        for name, tensor in saved.items():
            own[name].copy_(tensor)


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: Any, state: dict[str, Any], keep: int,
                    ema: dict[str, torch.Tensor] | None = None) -> Path:
    """Trainable tensors, optimizer/scheduler/loss-scaler state and the recipe, written to a temporary
    folder and renamed into place; then all but the newest `keep` checkpoints are removed. A write that
    fails (a full disk) removes its temporary folder and says which checkpoint a resume would use."""
    return _write_checkpoint(out_dir, step, _host_copy(model, optimizer, scheduler, scaler, ema), state, keep)


def _host_copy(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
               ema: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """What a checkpoint holds, copied to the host now: later steps may change the originals in place."""
    return {"weights": {n: t.to("cpu", copy=True) for n, t in trainable_state(model).items()},
            "ema": None if ema is None else {n: t.to("cpu", copy=True) for n, t in ema.items()},
            "rest": {"optimizer": _to_host(optimizer.state_dict()), "scheduler": copy.deepcopy(scheduler.state_dict()),
                     "scaler": scaler.state_dict() if scaler is not None else None}}


def _to_host(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _to_host(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_host(item) for item in value)
    return copy.deepcopy(value)


def _write_checkpoint(out_dir: Path, step: int, contents: dict[str, Any], state: dict[str, Any], keep: int) -> Path:
    folder = out_dir / CHECKPOINT_DIR
    final = checkpoint_path(out_dir, step)
    tmp = folder / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_safetensors(contents["weights"], tmp / CHECKPOINT_WEIGHTS)
        if contents.get("ema") is not None:
            save_safetensors(contents["ema"], tmp / CHECKPOINT_EMA)
        save_torch(contents["rest"], tmp / CHECKPOINT_OPTIMIZER)
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


class CheckpointWriter:
    """`save_checkpoint` off the training loop's critical path.

    `save` copies the state to the host (the trained tensors and the optimizer state: a few hundred MB at
    full size, a fraction of a second) and returns; a thread serializes and writes it while the next steps
    run. One write at a time: `save` first waits for the previous one. A failed write raises its
    CheckpointError (the synchronous one, unchanged) from the next `save` or from `wait`; `close` waits
    without raising, for `finally` blocks. `background=False` writes inside `save`."""

    def __init__(self, background: bool = True):
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, out_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
             scaler: Any, state: dict[str, Any], keep: int, ema: dict[str, torch.Tensor] | None = None) -> None:
        self.wait()
        contents = _host_copy(model, optimizer, scheduler, scaler, ema)
        if not self.background:
            _write_checkpoint(out_dir, step, contents, state, keep)
            return

        def write() -> None:
            try:
                _write_checkpoint(out_dir, step, contents, state, keep)
            except BaseException as error:  # noqa: BLE001 - handed to the training thread by wait()
                self._error = error

        self._thread = threading.Thread(target=write, name=f"checkpoint-{step}", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        """Until the pending write is done; raises its error, if it failed."""
        self.close()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        """Until the pending write is done (its error is kept for `wait`)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def read_checkpoint_state(path: Path) -> dict[str, Any]:
    """training_state.json of a checkpoint (step, recipe, images), checked before anything is loaded."""
    file = path / CHECKPOINT_STATE  # read by files.load_json like personalization.json; the checks below are this file's
    state = load_json(file, lambda error: CheckpointError(f"cannot read {file}: {error}; delete {path} to resume from "
                                                          "the checkpoint before it, or pass --overwrite to start over"))
    if (not isinstance(state, dict) or not isinstance(state.get("step"), int) or state["step"] < 0
            or not isinstance(state.get("recipe"), dict)):
        raise CheckpointError(f"{file} is not a training state (it needs a step and a recipe); delete {path} to "
                              "resume from the checkpoint before it, or pass --overwrite to start over")
    return state


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    scaler: Any) -> dict[str, Any]:
    """Restore what save_checkpoint wrote (compare `read_checkpoint_state` first); returns its state."""
    state = read_checkpoint_state(path)
    load_trainable(model, path / CHECKPOINT_WEIGHTS, "checkpoint weights",
                   "was it written with other LoRA targets or text-encoder mode?")
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


def recipe_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Settings that changed since the checkpoint and change what a step computes (compared as JSON
    stores them: a tuple and the list it was saved as are the same)."""
    saved, current = _as_json(saved), _as_json(current)
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(saved) | set(current))
            if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k)]


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=list))
