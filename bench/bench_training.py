"""Training speed and memory: optimizer steps per second, projected seconds per subject at the recipe and
peak memory of our training step against one with the reference entry's costs, measured in the same run.

    python -m bench.bench_training --size small --threads 1 --batch-size 2 --class-batch-size 2   # CPU
    python -m bench.bench_training --size full                                                   # GPU

Modes
  baseline       the reference entry's costs: nothing cached (the VAE encoder and the CLIP image tower run
                 on every batch, class prompts go through CLIP every step), fp32, LoRA r=64 on the default
                 targets; SDPA attention, which the official U-ViT code uses on torch >= 2 (and without
                 which fp32 batch 8 would not fit an 80 GB GPU at full size)
  default        a step as train.py runs it (libs.train's BatchMaker, loss_terms, total_loss and
                 make_optimizer): cached encodings, the config's rank, frozen weights in the mixed-
                 precision dtype (fp16 on CUDA, as `accelerate launch --mixed_precision fp16`; fp32 on CPU)
  ablations      default with one change: no_cache, checkpointing (gradient checkpointing), bf16, fp16,
                 fp32, no_lora_dropout (the LoRA inputs' dropout off: what it costs), foreach_adamw (AdamW
                 as a chain of multi-tensor ops; default: fused on CUDA), compile (torch.compile of the
                 U-ViT, as --compile), compile_blocks (regional: each block compiled); compilation shows
                 in warmup_times_s
  adapter_*      default with another U-ViT adapter family (--adapter: dora, loha, lokr, vera, oft; opt-in:
                 --modes default adapter_dora adapter_vera ...); each row records its trained parameters
                 (bench/bench_adapters.py compares the families: each in its own process for its own peak
                 memory, with the exact full-size counts)
  checkpoint/*   what writing a checkpoint costs the training thread: `sync` (save_checkpoint) and
                 `background` (CheckpointWriter.save: a copy to the host, the write in a thread; write_s
                 is how long the thread then took), on the default mode's model and optimizer

One step = batch assembly + forward + backward + gradient clipping + AdamW. The photos are synthetic and
the weights random (bench.common). projected_s_per_subject = the config's train_step x the median step
+ encoding the recipe's views once (10 photos and num_class_images class images, x2 with hflip) at the
measured seconds per view; the baseline encodes inside its steps instead. Validation images are not
counted (config.train.validation_steps adds a few sampling runs per subject).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import ml_collections
import numpy as np
import torch
from PIL import Image

from bench.common import (DTYPES, Measured, bench_config, common_parser, fmt_float, fmt_str, gib,
                          interleaved_runs, median, peak_memory, print_table, random_checkpoints, size_summary, start,
                          timing_fields, uvit_forward_flops, write_result)
from libs.errors import run_cli
from libs.adapters.families import FAMILIES
from libs.precision import autocast as training_autocast
from libs.prompts import fill_prompt
from libs.train import (BatchMaker, Models, Plan, TrainData, TrainImage, build_data, build_models, loss_terms,
                        make_optimizer, make_scheduler, save_checkpoint, total_loss)
from libs.train.checkpoints import CheckpointWriter

BENCH = "bench_training"
TOKEN = "<new1>"
CLASS_WORD = "boy"
BENCH_PHOTOS = 4
RECIPE_PHOTOS = 10  # the larger competition subjects (boy2, girl2)
REFERENCE_RANK = 64


@dataclass(frozen=True)
class Mode:
    """How one training step is done; the defaults are train.py's."""

    name: str
    cached: bool = True
    dtype: str | None = None  # mixed-precision dtype; None: fp16 on CUDA, fp32 elsewhere
    rank: int | None = None  # None: config.train.rank
    checkpointing: bool = False
    compile: bool = False
    cache_class_text: bool = True
    lora_dropout: float | None = None  # None: config.train.lora_dropout
    fused_adamw: bool | None = None  # None: make_optimizer's choice (fused on CUDA)
    compile_blocks: bool = False
    adapter: str | None = None  # None: config.train.adapter


DEFAULT = Mode("default")
BASELINE = Mode("baseline", cached=False, dtype="fp32", rank=REFERENCE_RANK, cache_class_text=False)
MODES = {mode.name: mode for mode in (
    BASELINE, DEFAULT,
    replace(DEFAULT, name="no_cache", cached=False),
    replace(DEFAULT, name="checkpointing", checkpointing=True),
    replace(DEFAULT, name="bf16", dtype="bf16"),
    replace(DEFAULT, name="fp16", dtype="fp16"),
    replace(DEFAULT, name="fp32", dtype="fp32"),
    replace(DEFAULT, name="no_lora_dropout", lora_dropout=0.0),
    replace(DEFAULT, name="foreach_adamw", fused_adamw=False),
    replace(DEFAULT, name="compile", compile=True),
    replace(DEFAULT, name="compile_blocks", compile_blocks=True),
    *(replace(DEFAULT, name=f"adapter_{family}", adapter=family) for family in FAMILIES if family != "lora"),
)}
# minutes of compilation, and the adapter families (a comparison of their own): only when asked for
OPT_IN = {"compile", "compile_blocks", *(name for name in MODES if name.startswith("adapter_"))}


def train_dtype(mode: Mode, device: torch.device) -> torch.dtype:
    if mode.dtype:
        return DTYPES[mode.dtype]
    return torch.float16 if device.type == "cuda" else torch.float32


def default_modes(device: torch.device) -> list[str]:
    """All but compilation (opt-in) and the dtype equal to default's (fp16 is left out on CPU, and so is
    foreach_adamw, which is the default there)."""
    skip = OPT_IN | {name for name, dtype in DTYPES.items() if dtype == train_dtype(DEFAULT, device)}
    if device.type == "cpu":
        skip |= {"fp16", "foreach_adamw"}
    return [name for name in MODES if name not in skip]


def synthetic_images(count: int, resolution: int, seed: int, caption: str | None = None) -> list[TrainImage]:
    """Smooth random colour fields: real-looking enough for the encoders, free of any personal data."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((resolution, resolution), Image.BICUBIC)
        images.append(TrainImage(Path(f"synthetic/{seed}-{i}.png"), image, "center", caption))
    return images


def mode_config(mode: Mode, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config train.py would run `mode` with (rank, gradient checkpointing, compile, LoRA dropout)."""
    local = copy.deepcopy(config)
    local.train.update(rank=mode.rank or int(config.train.rank), gradient_checkpointing=mode.checkpointing,
                       compile=mode.compile)
    if mode.lora_dropout is not None:
        local.train.lora_dropout = mode.lora_dropout
    if mode.adapter is not None:
        local.train.adapter = mode.adapter
    return local


def mode_models(mode: Mode, config: ml_collections.ConfigDict, plan: Plan, device: torch.device) -> Models:
    """libs.train.build_models for `mode`, from the random checkpoint files."""
    models = build_models(dataclasses.replace(plan, config=mode_config(mode, config)), device,
                          train_dtype(mode, device))
    if mode.compile_blocks:
        models.model.nnet.compile_blocks()
    return models


class TrainStep:
    """One optimizer step of libs.train.train's loop per call, with accelerate's parts done by hand (a loss
    scaler for fp16, gradient clipping); the learning-rate scheduler is left out (a few scalars)."""

    def __init__(self, mode: Mode, models: Models, data: TrainData, cfg: ml_collections.ConfigDict,
                 device: torch.device, seed: int):
        self.models, self.cfg, self.device = models, cfg, device
        self.batches = BatchMaker(data, cfg, models.autoencoder, seed, 0)
        self.optimizer = make_optimizer(models.trainable(), cfg, fused=mode.fused_adamw)
        self.params = [p for p in models.model.parameters() if p.requires_grad]
        self.dtype = train_dtype(mode, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.model = models.model.train()
        self.steps = itertools.count(1)

    def __call__(self) -> None:
        batch = self.batches(next(self.steps))
        with training_autocast(self.device, self.dtype):
            loss = total_loss(loss_terms(self.model, batch, self.device), self.cfg)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


def checkpoint_costs(step: TrainStep, folder: Path, repeats: int) -> dict[str, Measured]:
    """Seconds the training thread spends per checkpoint: writing it (`sync`), or handing it to
    CheckpointWriter (`background`; its `outputs` hold how long the thread then wrote), interleaved."""
    scheduler = make_scheduler(step.optimizer, step.cfg)
    state = {"recipe": step.cfg.to_dict(), "images": []}
    writer = CheckpointWriter()
    found = {name: Measured([], {}, [], []) for name in ("checkpoint/sync", "checkpoint/background")}
    for repeat in range(1, repeats + 1):
        for name, entry in found.items():
            with peak_memory(step.device) as memory:
                started = time.perf_counter()
                if name == "checkpoint/sync":
                    save_checkpoint(folder / "sync", repeat, step.model, step.optimizer, scheduler, step.scaler,
                                    state, keep=1)
                    entry.times.append(time.perf_counter() - started)
                else:
                    writer.save(folder / "background", repeat, step.model, step.optimizer, scheduler, step.scaler,
                                state, keep=1)
                    entry.times.append(time.perf_counter() - started)
                    writer.wait()
                    entry.outputs.append(time.perf_counter() - started - entry.times[-1])
            if not entry.memory or memory["peak_mem_bytes"] > entry.memory["peak_mem_bytes"]:
                entry.memory = memory
            print(f"  [{repeat}/{repeats}] {name}: {entry.times[-1]:.3f} s", flush=True)
    return found


def training_data(config, plan: Plan, models: Models, instance: list[TrainImage], classes: list[TrainImage],
                  device: torch.device, cached: bool) -> tuple[TrainData, float]:
    """libs.train.build_data with caching on or off, and the seconds it took: the difference between
    the two is the encoding of every view (both load the CLIP image tower and encode the class prompts)."""
    local = copy.deepcopy(config)
    local.train.cache_latents = cached
    started = time.perf_counter()
    data = build_data(dataclasses.replace(plan, config=local), instance, classes, models, device, True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return data, time.perf_counter() - started


def checkpoint_step(models: Models, cfg: ml_collections.ConfigDict, device: torch.device) -> TrainStep:
    """A TrainStep whose optimizer has taken one step on random gradients, without a forward or backward:
    the state a checkpoint holds, at sizes where a real step is out of reach (full size on a CPU)."""
    step = TrainStep.__new__(TrainStep)
    step.models, step.cfg, step.device, step.model = models, cfg, device, models.model
    step.optimizer = make_optimizer(models.trainable(), cfg)
    step.scaler = torch.amp.GradScaler(device.type, enabled=train_dtype(DEFAULT, device) == torch.float16)
    generator = torch.Generator().manual_seed(0)
    for _, param in models.trainable():
        param.grad = (torch.randn(param.shape, generator=generator) * 1e-3).to(param)
    step.optimizer.step()
    step.optimizer.zero_grad(set_to_none=True)
    return step


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = start(args)
    config = bench_config(args.size)
    cfg = config.train
    cfg.batch_size = args.batch_size or cfg.batch_size
    cfg.class_batch_size = args.class_batch_size or cfg.class_batch_size
    cfg.validation_steps = 0
    if args.checkpoint_only:
        return checkpoint_only(args, device, config)
    names = args.modes or default_modes(device)
    unknown = sorted(set(names) - set(MODES))
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    modes = [MODES[name] for name in (["baseline"] + [n for n in names if n != "baseline"])]
    flips = 2 if cfg.hflip else 1
    instance = synthetic_images(BENCH_PHOTOS, config.resolution, seed=1)
    classes = synthetic_images(max(2, cfg.class_batch_size), config.resolution, seed=2,
                               caption=f"a photo of a {CLASS_WORD}")
    recipe_views = (RECIPE_PHOTOS + int(cfg.num_class_images)) * flips
    batch = cfg.batch_size + cfg.class_batch_size
    step_flops = 2 * uvit_forward_flops(config.nnet, batch)
    with random_checkpoints(config) as config, tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        plan = Plan(config, Path("synthetic"), Path(tmp), CLASS_WORD, TOKEN, CLASS_WORD,
                    fill_prompt(cfg.instance_prompt, TOKEN, CLASS_WORD), None)
        trainables = {mode.name: mode_models(mode, config, plan, device) for mode in modes}
        first = trainables[modes[0].name]
        uncached, setup_s = training_data(config, plan, first, instance, classes, device, cached=False)
        cached, cached_setup_s = training_data(config, plan, first, instance, classes, device, cached=True)
        encode_view_s = max(0.0, cached_setup_s - setup_s) / ((len(instance) + len(classes)) * flips)
        runs = {}
        for mode in modes:
            data = copy.copy(cached if mode.cached else uncached)
            if not mode.cache_class_text:
                data.class_text = None
            runs[mode.name] = TrainStep(mode, trainables[mode.name], data, cfg, device, int(config.seed))
        measured = interleaved_runs(runs, device, args.repeats, args.warmup)
        saver = "default" if "default" in runs else modes[-1].name
        writes = checkpoint_costs(runs[saver], Path(tmp) / "checkpoints", args.repeats)
    rows = []
    baseline_s = None
    for mode in modes:
        record = {"config": mode.name, "size": args.size,
                  "sizes": {**size_summary(config), "batch_size": cfg.batch_size,
                            "class_batch_size": cfg.class_batch_size, "train_step": int(cfg.train_step),
                            "recipe_views": recipe_views},
                  "mode": {k: v for k, v in vars(mode).items() if k != "name"},
                  "dtype": str(train_dtype(mode, device)).removeprefix("torch."),
                  "lora_rank": mode.rank or int(cfg.rank),
                  "adapter": mode.adapter or str(cfg.adapter),
                  "trainable_parameters": sum(p.numel() for _, p in trainables[mode.name].trainable()),
                  **timing_fields(measured[mode.name], args.repeats, args.warmup)}
        baseline_s = baseline_s or record["median_s"]
        encode_s = encode_view_s * recipe_views if mode.cached else 0.0
        record.update(steps_per_s=1.0 / record["median_s"], encode_s_per_view=encode_view_s,
                      projected_encode_s=encode_s,
                      projected_s_per_subject=int(cfg.train_step) * record["median_s"] + encode_s,
                      model_flops_per_step=step_flops, tflops_per_s=step_flops / record["median_s"] / 1e12,
                      speedup_vs_baseline=baseline_s / record["median_s"])
        rows.append(record)
    subject_baseline = rows[0]["projected_s_per_subject"]
    for record in rows:
        record["subject_speedup_vs_baseline"] = subject_baseline / record["projected_s_per_subject"]
    rows = [write_result(args.results_dir, BENCH, record, device) for record in rows]
    print(f"{BENCH} size={args.size} batch={cfg.batch_size}+{cfg.class_batch_size} train_step={cfg.train_step} "
          f"device={rows[0]['device_name']} torch={torch.__version__}")
    print_table(rows, [("mode", "config", fmt_str), ("trained", "trainable_parameters", lambda v: "-" if v is None else f"{v:,}"),
                       ("s/step", "median_s", fmt_float(3)),
                       ("steps/s", "steps_per_s", fmt_float(3)), ("s/subject", "projected_s_per_subject", fmt_float(1)),
                       ("work GiB", "working_mem_bytes", gib), ("peak GiB", "peak_mem_bytes", gib),
                       ("x baseline", "speedup_vs_baseline", fmt_float(2)),
                       ("x subject", "subject_speedup_vs_baseline", fmt_float(2))])
    trainable = sum(p.numel() for _, p in runs[saver].models.trainable())
    return rows + checkpoint_rows(writes, args, config, device, saver, trainable)


def checkpoint_only(args: argparse.Namespace, device: torch.device, config) -> list[dict[str, Any]]:
    """Only the checkpoint/* lines, for the default mode's models (see checkpoint_step)."""
    with random_checkpoints(config) as config, tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        plan = Plan(config, Path("synthetic"), Path(tmp), CLASS_WORD, TOKEN, CLASS_WORD,
                    fill_prompt(config.train.instance_prompt, TOKEN, CLASS_WORD), None)
        step = checkpoint_step(mode_models(DEFAULT, config, plan, device), config.train, device)
        writes = checkpoint_costs(step, Path(tmp) / "checkpoints", args.repeats)
    trainable = sum(p.numel() for _, p in step.models.trainable())
    return checkpoint_rows(writes, args, config, device, "default (one step on random gradients)", trainable)


def checkpoint_rows(writes: dict[str, Measured], args: argparse.Namespace, config, device: torch.device,
                    of: str, trainable: int) -> list[dict[str, Any]]:
    sync_s = median(writes["checkpoint/sync"].times)
    rows = []
    for name, entry in writes.items():
        record = {"config": name, "size": args.size, "sizes": size_summary(config), "mode": {"of": of},
                  "trainable_parameters": trainable,
                  **timing_fields(entry, args.repeats, 0)}
        record.update(speedup_vs_baseline=sync_s / record["median_s"],
                      write_s=median(entry.outputs) if entry.outputs else record["median_s"])
        rows.append(write_result(args.results_dir, BENCH, record, device))
    print_table(rows, [("checkpoint", "config", fmt_str), ("training thread s", "median_s", fmt_float(3)),
                       ("written in s", "write_s", fmt_float(3)), ("x sync", "speedup_vs_baseline", fmt_float(2))])
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = common_parser(__doc__)
    parser.add_argument("--batch-size", type=int, default=None, help="instance views per step (config: 4)")
    parser.add_argument("--class-batch-size", type=int, default=None, help="class views per step (config: 4)")
    parser.add_argument("--modes", nargs="+", default=None,
                        help=f"modes to run (baseline always runs); default: all but the compile modes. "
                             f"Known: {list(MODES)}")
    parser.add_argument("--checkpoint-only", action="store_true",
                        help="only the checkpoint/* lines, after one optimizer step on random gradients (no "
                             "training step: for full size on a CPU)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    return run(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
