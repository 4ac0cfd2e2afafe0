"""The training recipe, top to bottom: plan, photos, models, data, then the steps, then the result.

Personalization training: a new token, optional text-encoder adapters and a U-ViT LoRA, trained with
UniDiffuser's joint noise-prediction loss (libs/train/batches.py) and DreamBooth prior preservation,
judged during training by the competition metric (libs/train/validation.py); the adapters written are
the best validated step's (libs/train/selection.py).
"""
from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ml_collections
import torch
from torch import nn
from tqdm.auto import tqdm

from libs.errors import Interrupted
from libs.face import FaceModelFailed
from libs.personalization import save_personalization
from libs.precision import DTYPES, autocast
from libs.stopping import StopSignals, resume_command
from libs.train import run_report
from libs.train.batches import BatchMaker, dropout_seed, loss_terms, total_loss
from libs.train.checkpoints import CheckpointWriter, load_checkpoint, read_checkpoint_state, recipe_differences
from libs.train.curves import plot_curves
from libs.train.ema import Ema
from libs.train.encodings import build_data, describe_sources
from libs.train.images import load_class_images, load_instance_images
from libs.train.metrics import MetricScorer, ScoreFn
from libs.train.model import JointNoisePredictor, build_models, count_trainable
from libs.train.optim import make_optimizer, make_scheduler
from libs.train.plan import Plan, TrainingError, make_plan
from libs.train.logs import RunLog, step_logs
from libs.train.records import personalization_meta, write_run_file
from libs.train.summary import start_summary
from libs.train.selection import Selection
from libs.train.validation import Validation
from libs.train_output import (CHECKPOINT_DIR, CHECKPOINT_EMA, CURVES_FILE, VALIDATION_DIR, candidate_path, claim_output,
                               list_checkpoints, prepare_output, remove_checkpoints)


@dataclass
class TrainResult:
    out_dir: Path
    step: int  # the steps trained
    trainable_parameters: int
    files: list[Path]
    selection: dict[str, Any]  # personalization.json's record: the chosen step, the objective, every step's scores


StepCallback = Callable[[int, dict[str, float]], None]


def train(config: ml_collections.ConfigDict, data_dir: str | Path, out_dir: str | Path, resume: str | None = None,
          overwrite: bool = False, mixed_precision: str | None = None,
          on_step: StepCallback | None = None, score_fn: ScoreFn | None = None) -> TrainResult | None:
    """Train one subject and write its personalization into `out_dir`; None when there was nothing to do.

    Every check (flags, photos, class set, output folder, model files, the scorer) runs before the first
    write, and the output folder is this run's alone while it trains (a second run on it stops at once,
    naming this one). `on_step(step, logs)` is called after every optimizer step (e.g. to watch the loss);
    an exception it raises stops the run like an interruption would, leaving the last checkpoint to resume from.
    `score_fn` scores a validated step's images (default: libs.train.metrics.MetricScorer, the competition
    metric); the step it rates best (by `objective`) is the one written. SIGTERM or SIGINT during the steps
    finishes the step, writes a checkpoint and raises `Interrupted` (libs.stopping); a second one stops at once.
    """
    hint = f"the last complete checkpoint is kept; continue with: {resume_command()}"
    with StopSignals(hint) as stop, claim_output(out_dir):
        return _train(config, data_dir, out_dir, resume, overwrite, mixed_precision, on_step, score_fn, stop)


def _train(config: ml_collections.ConfigDict, data_dir: str | Path, out_dir: str | Path, resume: str | None,
           overwrite: bool, mixed_precision: str | None, on_step: StepCallback | None,
           score_fn: ScoreFn | None, stop: StopSignals) -> TrainResult | None:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # the plan: settings, words, output folder, what to resume from; nothing written yet
    cfg = config.train
    plan = make_plan(config, data_dir, out_dir, resume, overwrite)
    accelerator = Accelerator(mixed_precision=mixed_precision)
    log = accelerator.print
    if plan.resume_from is None and resume and plan.finished:
        log(f"{plan.out_dir} already holds a finished personalization and no checkpoint: nothing to resume "
            "(pass --overwrite to train again)")
        return None

    # the photos and the class images, framed as squares
    instance = load_instance_images(plan.data_dir, config.resolution, cfg.crop, int(cfg.min_image_side),
                                    masks=bool(cfg.masked_loss))
    classes, class_warning = None, None
    if plan.class_dir is not None:
        classes, class_warning = load_class_images(plan.class_dir, config.resolution, int(cfg.num_class_images),
                                                   int(cfg.min_image_side), cfg.class_prompt)

    # the models: frozen towers in the mixed-precision dtype, trained tensors in fp32
    weight_dtype = DTYPES.get(accelerator.mixed_precision, torch.float32)
    seed = int(config.seed)
    set_seed(seed)
    models = build_models(plan, accelerator.device, weight_dtype)
    trainable_parameters = count_trainable(models.model)
    sources = describe_sources(instance) + (describe_sources(classes) if classes else [])
    if cfg.validation_steps and accelerator.is_main_process and score_fn is None:
        try:
            score_fn = MetricScorer(config, cfg.validation_face_backend, str(accelerator.device))
        except FaceModelFailed as error:
            raise _face_model_failed(plan, error, None) from error

    # the first write: the output folder and train_config.json
    if resume and plan.resume_from is None:
        log(f"no checkpoint in {plan.out_dir / CHECKPOINT_DIR}: starting a fresh run")
    if accelerator.is_main_process:
        prepare_output(plan.out_dir, overwrite)
        write_run_file(plan, accelerator, trainable_parameters, sources)
    accelerator.wait_for_everyone()

    # every image view encoded once, the prompts that do not train encoded once
    started = time.perf_counter()
    data = build_data(plan, instance, classes, models, accelerator.device, accelerator.is_main_process)
    if class_warning:
        data.warnings.append(class_warning)
    for warning in data.warnings:
        log(f"warning: {warning}")
    log(start_summary(plan, instance, classes, len(data.instance), trainable_parameters, models.uvit_spec, accelerator,
                      time.perf_counter() - started))

    # optimizer, schedule, accelerate's wrapping, and the checkpoint to continue from
    optimizer = make_optimizer(models.trainable(), cfg)
    scheduler = make_scheduler(optimizer, cfg)
    models.model.train()
    model, optimizer = accelerator.prepare(models.model, optimizer)
    unwrapped: JointNoisePredictor = accelerator.unwrap_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    ema = Ema(unwrapped, float(cfg.ema_decay))
    checkpoint_state = {"recipe": plan.recipe(), "images": [s["sha256"] for s in sources]}
    selection = Selection(plan.out_dir, cfg.selection, cfg.objective)
    start_step = 0
    if plan.resume_from is not None:
        start_step, saved = _resume(plan, unwrapped, optimizer, scheduler, accelerator.scaler, checkpoint_state)
        ema.load(plan.resume_from / CHECKPOINT_EMA)
        if start_step == cfg.train_step and plan.finished:
            log(f"{plan.out_dir} is already trained to step {start_step}: nothing to do")
            return None
        if accelerator.is_main_process:
            selection.restore(saved.get("selection"), start_step)
        log(f"resuming from {plan.resume_from} (step {start_step})")

    # the steps
    run_log = RunLog(plan.out_dir, accelerator.is_main_process, start_step)
    batches = BatchMaker(data, cfg, models.autoencoder, seed, accelerator.process_index)
    validation = Validation(plan, unwrapped, models.autoencoder, weight_dtype, data, run_log, accelerator,
                            score_fn, selection)
    checkpoints = CheckpointWriter()  # writes in a thread while the next steps run

    def save_checkpoint(step: int) -> None:
        checkpoints.save(plan.out_dir, step, unwrapped, optimizer, scheduler, accelerator.scaler,
                         {**checkpoint_state, "selection": selection.state()}, int(cfg.checkpoints_total_limit),
                         ema.state())
        selection.prune()  # keeps what the checkpoints on disk and the one being written refer to

    stop.deferring = True
    try:
        if start_step == 0:
            with ema.applied():
                validation(0)
        bar = tqdm(range(start_step + 1, int(cfg.train_step) + 1), initial=start_step, total=int(cfg.train_step),
                   desc=f"train {plan.out_dir.name}", unit="step", disable=not accelerator.is_main_process)
        for step in bar:
            torch.manual_seed(dropout_seed(seed, step, accelerator.process_index))
            batch = batches(step)
            with autocast(accelerator.device, weight_dtype):
                terms = loss_terms(model, batch, accelerator.device)
                loss = total_loss(terms, cfg)
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update()

            logs: dict[str, float] = {}
            if step % cfg.log_every == 0 or step == cfg.train_step:
                logs = step_logs(accelerator, loss, terms, scheduler, grad_norm, time.perf_counter() - started)
                run_log.write(step, logs)
                bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
                if not math.isfinite(logs["loss"]):
                    raise _diverged(plan, step, f"the loss became {logs['loss']}", checkpoints)
            validate_now = step == cfg.train_step or (cfg.validation_steps and step % cfg.validation_steps == 0)
            # a stop signal (libs.stopping): this step is checkpointed like a periodic one, then the run stops
            stopping = step < cfg.train_step and _stop_requested(stop, accelerator)
            checkpoint_now = (step % cfg.checkpointing_steps == 0 or (step == cfg.train_step and cfg.keep_checkpoints)
                              or stopping)
            if (checkpoint_now or validate_now) and not all(bool(torch.isfinite(p).all()) for p in params):
                raise _diverged(plan, step, "the trained weights hold NaN or inf values", checkpoints)
            # validated before the checkpoint of the same step, so a checkpoint holds its step's scores
            if validate_now:
                with ema.applied():  # the average is what is rendered, scored and kept as a candidate
                    validation(step)
            if accelerator.is_main_process and checkpoint_now:
                save_checkpoint(step)
            if on_step is not None:
                on_step(step, logs)
            if stopping:
                checkpoints.wait()
                raise _stopped(plan, step, stop.requested or signal.SIGTERM)
        bar.close()
        checkpoints.wait()
    except FaceModelFailed as error:  # a validation's face model stopped working: the run stops, nothing is lost
        checkpoints.close()
        raise _face_model_failed(plan, error, selection) from error
    finally:
        stop.deferring = False
        checkpoints.close()
        run_log.close()

    # the result: the chosen step's adapters as the personalization folder sample.py reads
    files: list[Path] = []
    record: dict[str, Any] = {}
    if accelerator.is_main_process:
        ema.copy_to_model()  # the last step's average, unless selection loads another step's candidate
        record = selection.finish(unwrapped, int(cfg.train_step), keep_pinned=bool(cfg.keep_checkpoints))
        meta = personalization_meta(plan, models, trainable_parameters, data.warnings, record)
        files = save_personalization(plan.out_dir, meta, unwrapped.nnet, unwrapped.text_encoder)
        if not cfg.keep_checkpoints:
            remove_checkpoints(plan.out_dir)
        if cfg.validation_steps:
            plot_curves(run_log.path, plan.out_dir / VALIDATION_DIR / CURVES_FILE, record["chosen_step"],
                        record["objective_used"])
        report = run_report.write_run_report(plan.out_dir)
        size = sum(f.stat().st_size for f in files) / 2**20
        log(f"wrote {plan.out_dir}: {', '.join(f.name for f in files)} ({size:.1f} MiB), the adapters of step "
            f"{record['chosen_step']} ({record['reason']}); {trainable_parameters:,} trained parameters; "
            f"{time.perf_counter() - started:.0f}s\nrun report: {report}")
    accelerator.wait_for_everyone()
    return TrainResult(plan.out_dir, int(cfg.train_step), trainable_parameters, files, record)


def _stop_requested(stop: StopSignals, accelerator: Any) -> bool:
    """Whether a stop signal arrived; with several processes, whether any got one (all stop after the same step)."""
    requested = stop.requested is not None
    if accelerator.num_processes > 1:
        flag = torch.tensor([float(requested)], device=accelerator.device)
        requested = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
    return requested


def _stopped(plan: Plan, step: int, signum: int) -> Interrupted:
    """The run stopped on a signal after writing its checkpoint: say where, and the command that continues."""
    kept = list_checkpoints(plan.out_dir)
    where = f"checkpoint {kept[-1]} written" if kept else "this process wrote no checkpoint (another one does)"
    return Interrupted(f"{signal.Signals(signum).name} at step {step} of {plan.train.train_step}: {where}; continue "
                       f"with: {resume_command()} (./train.sh continues interrupted subjects by itself)", signum)


def _face_model_failed(plan: Plan, error: FaceModelFailed, selection: Selection | None) -> TrainingError:
    """The face model that judges validations cannot be used: what failed, what is kept, the command that
    continues once it is installed again (it scores the next validation with the same model)."""
    kept = list_checkpoints(plan.out_dir)
    if selection is None:
        where = "Nothing was trained" + (f"; the checkpoints in {plan.out_dir / CHECKPOINT_DIR} are untouched"
                                         if kept else "")
    else:
        best = (f"the best step so far ({selection.best}) in {candidate_path(plan.out_dir, selection.best)}"
                if selection.best is not None else "no step was chosen yet")
        where = (f"The run stopped at a validation; kept: the last complete checkpoint "
                 f"{kept[-1] if kept else '(none written yet)'}, {best}")
    return TrainingError(f"{error}. {where}. After the fix continue with: {resume_command()}")


class DivergedError(TrainingError):
    """The loss or the trained weights became NaN/inf: this recipe cannot be trained as set."""


def _diverged(plan: Plan, step: int, what: str, checkpoints: CheckpointWriter) -> DivergedError:
    """Training cannot go on; say so, and which checkpoint is the last good one (nothing non-finite is saved)."""
    checkpoints.close()
    kept = list_checkpoints(plan.out_dir)
    last = (f"the last good checkpoint is {kept[-1]} (`--resume latest` retries from it with the same settings)"
            if kept else "no checkpoint was written before it")
    return DivergedError(f"{what} at step {step}: training stopped; {last}. Lower --lr (or keep --max_grad_norm > 0) "
                         "and pass --overwrite to start again")


def _resume(plan: Plan, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
            checkpoint_state: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Load the checkpoint if it was made with the same recipe and images; returns its step and state. The
    recipe is compared before any tensor is loaded, so a changed setting is named instead of failing on a shape."""
    saved = read_checkpoint_state(plan.resume_from)
    changed = recipe_differences(saved.get("recipe", {}), checkpoint_state["recipe"])
    if changed:
        raise TrainingError(f"{plan.resume_from} was trained with other settings: {'; '.join(changed)}; "
                            "resume with the same settings or pass --overwrite to start over")
    if saved.get("images") != checkpoint_state["images"]:
        raise TrainingError(f"the photos or class images changed since {plan.resume_from} was written; "
                            "pass --overwrite to start over with the new ones")
    load_checkpoint(plan.resume_from, model, optimizer, scheduler, scaler)
    step = int(saved["step"])
    if step > plan.train.train_step:
        raise TrainingError(f"{plan.resume_from} is at step {step}, beyond --train_step {plan.train.train_step}")
    return step, saved
