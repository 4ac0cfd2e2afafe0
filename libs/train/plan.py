"""The plan of a training run: everything decided before a file is touched.

`make_plan` checks the settings, works out the class word, token and prompts, and decides what happens
to the output folder (a fresh run, a resume from which checkpoint, or a refusal), so a bad request
fails before anything is read or written.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_collections

from libs.config import KEY_CHOICES, latent_shape, range_problems
from libs.download import TRAINING_WEIGHTS, ensure_weights
from libs.errors import UserError
from libs.prompts import fill_prompt
from libs.layout import class_word_from_path
from libs.train.selection import Objective, SelectionError
from libs.train_output import CHECKPOINT_DIR, CHECKPOINT_STATE, META_FILE, REPORT_FILE, list_checkpoints


class TrainingError(UserError):
    """A problem with the request (flags, output folder, checkpoint) found before anything is written."""


@dataclass
class Plan:
    """The resolved request: paths, words, prompts, and what to resume from."""

    config: ml_collections.ConfigDict
    data_dir: Path
    out_dir: Path
    class_word: str
    token: str | None
    initializer: str
    instance_prompt: str
    class_dir: Path | None
    resume_from: Path | None = None
    finished: bool = False  # the output already holds a finished personalization

    @property
    def train(self) -> ml_collections.ConfigDict:
        return self.config.train

    def recipe(self) -> dict[str, Any]:
        """The settings that define the result (train block + resolution, seed and the resolved words)."""
        config = self.config
        return {**config.train.to_dict(), "resolution": config.resolution, "seed": config.seed,
                "data_type": config.data_type, "class_word": self.class_word, "initializer_token": self.initializer,
                "instance_prompt": self.instance_prompt, "nnet": str(config.paths.nnet)}


def make_plan(config: ml_collections.ConfigDict, data_dir: str | Path, out_dir: str | Path,
              resume: str | None = None, overwrite: bool = False) -> Plan:
    """Check the settings and the output folder; raises TrainingError, writes nothing."""
    cfg = config.train
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    for key, allowed in ((dotted[len("train."):], allowed) for dotted, allowed in KEY_CHOICES.items()
                         if dotted.startswith("train.")):
        if cfg[key] not in allowed:
            raise TrainingError(f"{key} {cfg[key]!r} not in {allowed}")
    if cfg.adapter == "none" and cfg.text_encoder_mode == "frozen":
        raise TrainingError("adapter none with text_encoder_mode frozen trains nothing: choose an --adapter or a "
                            "--text_encoder_mode other than frozen")
    if "text_out" in cfg.lora_targets:
        raise TrainingError("LoRA target text_out never gets a gradient from the text-to-image loss (the text is "
                            "clean, t_text = 0): leave it out")
    problems = range_problems(config, ["seed", "resolution", *(f"train.{key}" for key in cfg)])
    if problems:
        raise TrainingError("; ".join(problems))
    try:
        Objective.parse(cfg.objective)
    except SelectionError as error:
        raise TrainingError(str(error)) from error
    if cfg.with_prior_preservation and (cfg.class_batch_size < 1 or cfg.num_class_images < 1):
        raise TrainingError("prior preservation needs class_batch_size >= 1 and num_class_images >= 1")
    latent_shape(config)  # the resolution must fit the VAE and the patch size
    if resume and overwrite:
        raise TrainingError("--resume and --overwrite contradict each other: pick one")
    ensure_weights(config, TRAINING_WEIGHTS)  # now, not after the photos are read

    class_word = cfg.class_word or class_word_from_path(data_dir)
    token = cfg.modifier_token if cfg.text_encoder_mode != "frozen" else None
    if token is not None and not token.strip():
        raise TrainingError("modifier_token is empty; use e.g. <new1> (or text_encoder_mode frozen for no token)")
    instance_prompt = fill_prompt(cfg.instance_prompt, token, class_word)
    if token and token not in instance_prompt:
        raise TrainingError(f"the instance prompt {instance_prompt!r} does not contain the token {token}: "
                            "the token would never train (put {token} in --instance_prompt)")
    class_dir = None
    if cfg.with_prior_preservation:
        class_dir = Path(cfg.class_data_dir.replace("{class_word}", class_word))
    if cfg.cache_dir and cfg.cache_latents and Path(cfg.cache_dir).exists() and not Path(cfg.cache_dir).is_dir():
        raise TrainingError(f"--cache_dir {cfg.cache_dir} is a file, not a folder: pick a folder for the encodings")

    plan = Plan(config, data_dir, out_dir, class_word, token, cfg.initializer_token or class_word, instance_prompt,
                class_dir)
    _check_output(plan, resume, overwrite)
    return plan


def _check_output(plan: Plan, resume: str | None, overwrite: bool) -> None:
    """Decide between a fresh run, a resume and a refusal, from what the output folder holds."""
    out = plan.out_dir
    if out.exists() and not out.is_dir():
        raise TrainingError(f"output path {out} is a file, not a folder")
    if (out / REPORT_FILE).is_dir():
        raise TrainingError(f"{out / REPORT_FILE} is a folder, where the run writes its report page: move it away")
    plan.finished = (out / META_FILE).is_file()
    checkpoints = list_checkpoints(out)
    if resume:
        if resume == "latest":
            plan.resume_from = checkpoints[-1] if checkpoints else None
        else:
            plan.resume_from = Path(resume)
            if not (plan.resume_from / CHECKPOINT_STATE).is_file():
                raise TrainingError(f"--resume {resume}: not a checkpoint folder (no {CHECKPOINT_STATE}); "
                                    f"checkpoints live in {out / CHECKPOINT_DIR}")
        return
    if overwrite:
        return
    if plan.finished:
        raise TrainingError(f"{out} already holds a finished personalization; pass --overwrite to train it again "
                            "(or --resume latest to continue from its last checkpoint)")
    if checkpoints:
        raise TrainingError(f"{out} holds checkpoints of an unfinished run (latest: {checkpoints[-1].name}); "
                            "pass --resume latest to continue it or --overwrite to start over")
