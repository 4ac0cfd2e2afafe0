"""A run's records: train_config.json (how it was started, enough to repeat it) and personalization.json's
meta record of what was trained. The logs are libs/train/logs.py, the start summary libs/train/summary.py,
the folder's names libs/train_output.py's."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from libs.files import cached_sha256, save_json
from libs.config import REPO_ROOT
from libs.personalization import adapter_meta
from libs.train.model import Models
from libs.train.plan import Plan
from libs.train_output import RUN_FILE

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


def personalization_meta(plan: Plan, models: Models, trainable: int, warnings: list[str],
                         selection: dict[str, Any]) -> dict[str, Any]:
    """personalization.json's record of what was trained (sample.py rebuilds the adapters from it): `steps`
    is the chosen step (the adapters' optimizer steps), `selection` how it was chosen and every step's scores."""
    config = plan.config
    cfg = config.train
    nnet_path = Path(config.paths.nnet)
    meta = {
        "modifier_token": plan.token,
        "initializer_token": plan.initializer if plan.token else None,
        "num_vectors": int(cfg.num_vectors) if plan.token else 0,
        "class_word": plan.class_word,
        "instance_prompt": plan.instance_prompt,
        "text_encoder_mode": cfg.text_encoder_mode,
        **adapter_meta(models.uvit_spec),
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
