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
                 fp32, compile (torch.compile of the U-ViT, as --compile; compilation shows in warmup_times_s)

One step = batch assembly + forward + backward + gradient clipping + AdamW. The photos are synthetic and
the weights random (bench.common). projected_s_per_subject = the config's train_step x the median step
+ encoding the recipe's views once (10 photos and num_class_images class images, x2 with hflip) at the
measured seconds per view; the baseline encodes inside its steps instead. Validation images are not
counted (config.train.validation_steps adds a few sampling runs per subject).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np
import torch
from PIL import Image

from bench.common import (DTYPES, bench_config, common_parser, fmt_float, fmt_str, gib, interleaved_runs,
                          print_table, random_checkpoints, size_summary, start, timing_fields, uvit_forward_flops,
                          write_result)
from libs.precision import autocast as training_autocast
from libs.prompts import fill_prompt
from libs.train import (BatchMaker, Models, Plan, TrainData, TrainImage, build_data, build_models, loss_terms,
                        make_optimizer, total_loss)

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


DEFAULT = Mode("default")
BASELINE = Mode("baseline", cached=False, dtype="fp32", rank=REFERENCE_RANK, cache_class_text=False)
MODES = {mode.name: mode for mode in (
    BASELINE, DEFAULT,
    replace(DEFAULT, name="no_cache", cached=False),
    replace(DEFAULT, name="checkpointing", checkpointing=True),
    replace(DEFAULT, name="bf16", dtype="bf16"),
    replace(DEFAULT, name="fp16", dtype="fp16"),
    replace(DEFAULT, name="fp32", dtype="fp32"),
    replace(DEFAULT, name="compile", compile=True),
)}


def train_dtype(mode: Mode, device: torch.device) -> torch.dtype:
    if mode.dtype:
        return DTYPES[mode.dtype]
    return torch.float16 if device.type == "cuda" else torch.float32


def default_modes(device: torch.device) -> list[str]:
    """All but compile (opt-in) and the dtype equal to default's (fp16 is left out on CPU)."""
    skip = {"compile"} | {name for name, dtype in DTYPES.items() if dtype == train_dtype(DEFAULT, device)}
    if device.type == "cpu":
        skip.add("fp16")
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
    """The config train.py would run `mode` with (rank, gradient checkpointing, compile)."""
    local = copy.deepcopy(config)
    local.train.update(rank=mode.rank or int(config.train.rank), gradient_checkpointing=mode.checkpointing,
                       compile=mode.compile)
    return local


def mode_models(mode: Mode, config: ml_collections.ConfigDict, plan: Plan, device: torch.device) -> Models:
    """libs.train.build_models for `mode`, from the random checkpoint files."""
    return build_models(mode_config(mode, config), plan, device, train_dtype(mode, device))


def make_step(mode: Mode, models: Models, data: TrainData, cfg: ml_collections.ConfigDict, device: torch.device,
              seed: int) -> Callable[[], None]:
    """One optimizer step of libs.train.train's loop, with accelerate's parts done by hand (a loss scaler
    for fp16, gradient clipping); the learning-rate scheduler is left out (a few scalars)."""
    batches = BatchMaker(data, cfg, models.autoencoder, seed, 0)
    optimizer = make_optimizer(models.trainable(), cfg)
    params = [p for p in models.model.parameters() if p.requires_grad]
    dtype = train_dtype(mode, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    model = models.model.train()
    steps = itertools.count(1)

    def step() -> None:
        batch = batches(next(steps))
        with training_autocast(device, dtype):
            loss = total_loss(loss_terms(model, batch, device), cfg)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


def training_data(config, plan: Plan, models: Models, instance: list[TrainImage], classes: list[TrainImage],
                  device: torch.device, cached: bool) -> tuple[TrainData, float]:
    """libs.train.build_data with caching on or off, and the seconds it took: the difference between
    the two is the encoding of every view (both load the CLIP image tower and encode the class prompts)."""
    local = copy.deepcopy(config)
    local.train.cache_latents = cached
    started = time.perf_counter()
    data = build_data(local, plan, instance, classes, models, device, True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return data, time.perf_counter() - started


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = start(args)
    config = bench_config(args.size)
    cfg = config.train
    cfg.batch_size = args.batch_size or cfg.batch_size
    cfg.class_batch_size = args.class_batch_size or cfg.class_batch_size
    cfg.validation_steps = 0
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
            runs[mode.name] = make_step(mode, trainables[mode.name], data, cfg, device, int(config.seed))
        measured = interleaved_runs(runs, device, args.repeats, args.warmup)
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
    print_table(rows, [("mode", "config", fmt_str), ("s/step", "median_s", fmt_float(3)),
                       ("steps/s", "steps_per_s", fmt_float(3)), ("s/subject", "projected_s_per_subject", fmt_float(1)),
                       ("work GiB", "working_mem_bytes", gib), ("peak GiB", "peak_mem_bytes", gib),
                       ("x baseline", "speedup_vs_baseline", fmt_float(2)),
                       ("x subject", "subject_speedup_vs_baseline", fmt_float(2))])
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = common_parser(__doc__)
    parser.add_argument("--batch-size", type=int, default=None, help="instance views per step (config: 4)")
    parser.add_argument("--class-batch-size", type=int, default=None, help="class views per step (config: 4)")
    parser.add_argument("--modes", nargs="+", default=None,
                        help=f"modes to run (baseline always runs); default: all but compile. Known: {list(MODES)}")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
