"""train.py's output folder (`-o`, the competition's `model_output/<name>/`): every file and folder name
in it, its preparation and cleanup, and the listings other modules read.

    personalization.json             what was trained (libs/personalization/ours.py writes and reads it)
    uvit_lora.safetensors            U-ViT LoRA weights
    uvit_adapter.safetensors         instead, the U-ViT weights of another adapter family (--adapter)
    token_embeddings.safetensors     {"<new1>": [num_vectors, 768]}
    text_encoder_lora.safetensors    only with text_encoder_mode "lora"
    text_encoder.safetensors         only with text_encoder_mode "full"
    train_config.json                the full config, photos (with sha256), versions, command line
    logs/train_log.jsonl             one line per logged step (loss terms, learning rates, eval losses)
    logs/tensorboard/                the same scalars and the validation grids, when tensorboard is installed
    checkpoints/checkpoint-000300/   trainable.safetensors, optimizer.pt, training_state.json, ema.safetensors (--ema_decay) (resumable)
    validation/step-000100.jpg       the validation grids
    validation/step-000100/          the validation images in the competition layout
    validation/prompts/              their prompt files
    validation/curves.png            the scores against the step
    candidates/step-*.safetensors    the best validated step's tensors until the run ends
    auto_recipe/                     --auto_recipe's candidate runs, table.csv, report.html, frontier.png and
                                     failed.json
    report.html                      the run report (libs/train/run_report.py), refreshed at each validation
    report_files/                    the run report's thumbnails of the photos

It lives beside libs/train, not in it, because sample.py's reader (libs/personalization) also looks into
this folder (an unfinished run's checkpoints) and must not import the training package.
"""
from __future__ import annotations

import os
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ContextManager

from libs.locks import claimed_folder
from libs.outputs import check_output_folder, only

META_FILE = "personalization.json"
UVIT_LORA_FILE = "uvit_lora.safetensors"
UVIT_ADAPTER_FILE = "uvit_adapter.safetensors"
TOKEN_FILE = "token_embeddings.safetensors"
TEXT_LORA_FILE = "text_encoder_lora.safetensors"
TEXT_FULL_FILE = "text_encoder.safetensors"
RUN_FILE = "train_config.json"
OUTPUT_FILES = (META_FILE, UVIT_LORA_FILE, UVIT_ADAPTER_FILE, TOKEN_FILE, TEXT_LORA_FILE, TEXT_FULL_FILE, RUN_FILE)
LOG_DIR = "logs"
LOG_FILE = "train_log.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_STATE = "training_state.json"
CHECKPOINT_WEIGHTS = "trainable.safetensors"
CHECKPOINT_OPTIMIZER = "optimizer.pt"
CHECKPOINT_EMA = "ema.safetensors"
VALIDATION_DIR = "validation"
PROMPTS_DIR = "prompts"
CURVES_FILE = "curves.png"
CANDIDATE_DIR = "candidates"
AUTO_DIR = "auto_recipe"
TABLE_FILE = "table.csv"
REPORT_FILE = "report.html"  # the page of a run folder and of its auto_recipe/ search folder
REPORT_FILES_DIR = "report_files"
FRONTIER_FILE = "frontier.png"
FAILED_FILE = "failed.json"  # in auto_recipe/: the recipes that diverged, with why (never retrained on resume)
# everything a run writes at the top of -o: an existing folder holding anything else is not a run's, and
# train.py refuses it (libs/outputs.py)
OUTPUT_ENTRIES = (*OUTPUT_FILES, LOG_DIR, CHECKPOINT_DIR, VALIDATION_DIR, CANDIDATE_DIR, AUTO_DIR, REPORT_FILE,
                  REPORT_FILES_DIR)


OUTPUT_WHAT = "output folder (-o)"


def _holds_output() -> bool:
    """Whether this process holds -o: rank 0 of a launched group, or a lone process. Read from the environment:
    accelerate is not set up yet, and setting it up here would fix its state before the run's Accelerator
    chooses it."""
    return int(os.environ.get("RANK", "0")) == 0


def claim_output(out_dir: str | Path) -> ContextManager[Any]:
    """The output folder held by this run for its whole length (libs.locks), by the process that holds -o. An
    existing folder holding anything but what a run writes (OUTPUT_ENTRIES) is someone else's and refused."""
    return claimed_folder(out_dir, "train.py", OUTPUT_WHAT, only(*OUTPUT_ENTRIES)) if _holds_output() else nullcontext()


def check_output(out_dir: str | Path) -> None:
    """claim_output's check alone (nothing created, nothing locked): train.py runs it before it imports the
    training stack, so a refused -o costs no torch import; the run claims the folder again."""
    if _holds_output():
        check_output_folder(out_dir, OUTPUT_WHAT, only(*OUTPUT_ENTRIES))


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR / f"{CHECKPOINT_PREFIX}{step:06d}"


def checkpoint_step(checkpoint: Path) -> int:
    """The step a checkpoint folder holds, from its name."""
    return int(checkpoint.name[len(CHECKPOINT_PREFIX):])


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints (they are renamed into place only when fully written), oldest first."""
    folder = Path(out_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and (p / CHECKPOINT_STATE).is_file()]
    return sorted(found, key=checkpoint_step)


def remove_checkpoints(out_dir: Path) -> None:
    """Delete our checkpoint folders (and the checkpoints folder when that leaves it empty)."""
    folder = out_dir / CHECKPOINT_DIR
    for checkpoint in list_checkpoints(out_dir) + list(folder.glob(f".{CHECKPOINT_PREFIX}*.tmp")):
        shutil.rmtree(checkpoint)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def validation_step_dir(out_dir: Path, step: int) -> Path:
    """`validation/step-<step>/`: a step's validation images in the competition layout."""
    return Path(out_dir) / VALIDATION_DIR / f"step-{step:06d}"


def validation_grid(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / VALIDATION_DIR / f"step-{step:06d}.jpg"


def candidate_path(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / CANDIDATE_DIR / f"step-{step:06d}.safetensors"


def candidate_files(out_dir: Path) -> list[Path]:
    folder = Path(out_dir) / CANDIDATE_DIR
    return sorted(folder.glob("step-*.safetensors")) if folder.is_dir() else []


def candidate_step(path: Path) -> int:
    return int(path.stem.split("-")[1])


def prepare_output(out: Path, overwrite: bool) -> None:
    """Create the folder; with --overwrite first remove what an earlier run wrote there (by name, nothing else)."""
    if overwrite and out.is_dir():
        for name in OUTPUT_FILES:
            (out / name).unlink(missing_ok=True)
        (out / LOG_DIR / LOG_FILE).unlink(missing_ok=True)
        shutil.rmtree(out / LOG_DIR / TENSORBOARD_DIR, ignore_errors=True)
        validation = out / VALIDATION_DIR
        for old in [*validation.glob("step-*"), validation / PROMPTS_DIR, out / CANDIDATE_DIR]:
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()
        (validation / CURVES_FILE).unlink(missing_ok=True)
        (out / REPORT_FILE).unlink(missing_ok=True)
        shutil.rmtree(out / REPORT_FILES_DIR, ignore_errors=True)
        remove_checkpoints(out)
    out.mkdir(parents=True, exist_ok=True)
