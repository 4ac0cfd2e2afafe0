"""The U-ViT adapter families side by side (--adapter: lora, dora, loha, lokr, vera, oft): a training step's
time and peak memory measured at a size this machine can train, and what is exact at full size without running.

    python -m bench.bench_adapters --size small --threads 1 --batch-size 2 --class-batch-size 2   # CPU
    python -m bench.bench_adapters --size full --device cuda                                      # GPU

Lines
  measured/<family>  each family in a process of its own (`--measure <family>`), so that its peak is its own:
                     the models built with the family's adapter (libs.train.build_models), the cached views, then
                     bench_training's TrainStep (a train.py step: batch, forward, backward, clipping, AdamW)
                     warmed up and timed `--repeats` times. median_s and ratio_to_lora (this family's median over
                     LoRA's in the same run; the processes run one after another, so on a loaded machine compare
                     lines of one run only). peak_mem_bytes: over the timed steps, torch.cuda.max_memory_allocated
                     on CUDA, the peak RSS on CPU (bench.common.peak_memory; working_mem_bytes: above what was held
                     before the step); setup_peak_rss_bytes: the process's peak RSS before the steps
                     (resource.getrusage: random weights written and loaded, the adapter injected, views encoded).
  computed/<family>  at `--computed-size` (default full), on the meta device: nothing is run or allocated, the
                     figures are exact counts of the adapter train.py would inject: trainable_parameters (the U-ViT
                     adapter's trained values, sample.py's spec §7 count without the token row), trained_state_bytes
                     (those values in fp32, as train.py keeps them, + their fp32 gradients + AdamW's two fp32
                     moments: 16 bytes per value) and buffer_bytes (the adapter's untrained tensors: VeRA's seeded
                     projections, OFT's indices). Their timing and memory fields are null: computed, not measured.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

from bench.bench_training import (BENCH_PHOTOS, CLASS_WORD, DEFAULT, TOKEN, TrainStep, mode_config, mode_models,
                                  synthetic_images, training_data, train_dtype)
from bench.common import (RESULT_FIELDS, bench_config, common_parser, fmt_float, fmt_str, gib, interleaved_runs,
                          print_table, random_checkpoints, size_summary, start, timing_fields, write_result)
from libs.adapters.families import FAMILIES
from libs.errors import UserError, run_cli
from libs.prompts import fill_prompt
from libs.models.loading import build_uvit
from libs.train import Plan
from libs.train.param_budget import meta_uvit_adapter

BENCH = "bench_adapters"
STATE_BYTES_PER_VALUE = 4 + 4 + 8  # fp32 value, fp32 gradient, AdamW's exp_avg and exp_avg_sq in fp32


class BenchDeviceError(UserError):
    """A --device this machine does not have."""


def measure_family(args: argparse.Namespace) -> dict[str, Any]:
    """One family's training step, in this process (`--measure`): timing, peaks and its trained values."""
    device = start(args)
    config = bench_config(args.size)
    cfg = config.train
    cfg.update(batch_size=args.batch_size or cfg.batch_size, class_batch_size=args.class_batch_size or cfg.class_batch_size,
               validation_steps=0)
    mode = replace(DEFAULT, name=f"adapter_{args.measure}", adapter=args.measure)
    instance = synthetic_images(BENCH_PHOTOS, config.resolution, seed=1)
    classes = synthetic_images(max(2, cfg.class_batch_size), config.resolution, seed=2,
                               caption=f"a photo of a {CLASS_WORD}")
    with random_checkpoints(config) as config, tempfile.TemporaryDirectory(prefix="bench_adapters_") as tmp:
        plan = Plan(config, Path("synthetic"), Path(tmp), CLASS_WORD, TOKEN, CLASS_WORD,
                    fill_prompt(cfg.instance_prompt, TOKEN, CLASS_WORD), None)
        models = mode_models(mode, config, plan, device)
        data, _ = training_data(config, plan, models, instance, classes, device, cached=True)
        step = TrainStep(mode, models, data, cfg, device, int(config.seed))
        # read before the steps: peak_memory resets the kernel's peak mark, which getrusage reads too
        setup_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        measured = interleaved_runs({args.measure: step}, device, args.repeats, args.warmup)[args.measure]
        trained = sum(p.numel() for p in models.model.nnet.parameters() if p.requires_grad)  # the U-ViT adapter
    return {"trainable_parameters": trained, "dtype": str(train_dtype(mode, device)).removeprefix("torch."),
            "batch_size": int(cfg.batch_size), "class_batch_size": int(cfg.class_batch_size),
            "setup_peak_rss_bytes": setup_peak,
            **timing_fields(measured, args.repeats, args.warmup)}


def measure_command(family: str, args: argparse.Namespace, out: Path) -> list[str]:
    """The process that measures `family` with this run's settings."""
    command = [sys.executable, "-m", "bench.bench_adapters", "--measure", family, "--measure-out", str(out),
               "--size", args.size, "--repeats", str(args.repeats), "--warmup", str(args.warmup),
               "--results-dir", str(args.results_dir)]
    for flag, value in (("--device", args.device), ("--threads", args.threads), ("--batch-size", args.batch_size),
                        ("--class-batch-size", args.class_batch_size)):
        if value:
            command += [flag, str(value)]
    return command


def computed_family(size: str, family: str) -> dict[str, Any]:
    """The exact counts of `family`'s adapter at `size`, on the meta device (see the module's docstring)."""
    config = bench_config(size)
    nnet, spec = meta_uvit_adapter(mode_config(replace(DEFAULT, adapter=family), config))
    trained = sum(p.numel() for name, p in nnet.named_parameters() if spec.prefix in name)
    buffers = _buffer_bytes(nnet) - _buffer_bytes(build_uvit(config, "meta"))  # the adapter's, each shared one once
    return {"config": f"computed/{family}", "size": size, "sizes": size_summary(config), "adapter": family,
            "computed": True, "trainable_parameters": trained, "trained_state_bytes": trained * STATE_BYTES_PER_VALUE,
            "buffer_bytes": buffers, **{field: None for field in RESULT_FIELDS[RESULT_FIELDS.index("repeats"):]}}


def _buffer_bytes(module: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())  # a tensor shared by layers counts once


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = start(args)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchDeviceError(f"--device {args.device}: this machine has no usable CUDA GPU; leave --device out "
                               "(or --device cpu) to measure on the CPU")
    families = ["lora", *(f for f in dict.fromkeys(args.families) if f != "lora")]  # LoRA: the ratios' reference
    measured = []
    with tempfile.TemporaryDirectory(prefix="bench_adapters_") as tmp:
        for family in families:
            out = Path(tmp) / f"{family}.json"
            print(f"=== {family}: {' '.join(measure_command(family, args, out))}", flush=True)
            subprocess.run(measure_command(family, args, out), check=True)
            measured.append((family, json.loads(out.read_text())))
    config = bench_config(args.size)
    lora_s = measured[0][1]["median_s"]
    rows = []
    for family, result in measured:
        record = {"config": f"measured/{family}", "size": args.size, "sizes": size_summary(config), "adapter": family,
                  "computed": False, **result, "ratio_to_lora": result["median_s"] / lora_s,
                  "speedup_vs_baseline": lora_s / result["median_s"]}
        rows.append(write_result(args.results_dir, BENCH, record, device))
    computed = [write_result(args.results_dir, BENCH, computed_family(args.computed_size, family), device)
                for family in families]
    print(f"{BENCH} measured: size={args.size} device={rows[0]['device_name']} torch={torch.__version__}")
    print_table(rows, [("family", "adapter", fmt_str), ("trained", "trainable_parameters", lambda v: f"{v:,}"),
                       ("s/step", "median_s", fmt_float(3)), ("x LoRA time", "ratio_to_lora", fmt_float(2)),
                       ("step peak GiB", "peak_mem_bytes", gib), ("step working GiB", "working_mem_bytes", gib),
                       ("setup peak GiB", "setup_peak_rss_bytes", gib)])
    print(f"{BENCH} computed (meta device, not run): size={args.computed_size}")
    print_table(computed, [("family", "adapter", fmt_str), ("trained", "trainable_parameters", lambda v: f"{v:,}"),
                           ("trained+grad+Adam MiB", "trained_state_bytes", lambda v: f"{v / 2**20:.1f}"),
                           ("buffers MiB", "buffer_bytes", lambda v: f"{v / 2**20:.2f}")])
    return rows + computed


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = common_parser(__doc__)
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES),
                        help="families to measure (LoRA, the ratios' reference, always runs); default: all")
    parser.add_argument("--batch-size", type=int, default=None, help="instance views per step (config: 4)")
    parser.add_argument("--class-batch-size", type=int, default=None, help="class views per step (config: 4)")
    parser.add_argument("--computed-size", choices=("tiny", "small", "full"), default="full",
                        help="the size of the computed/<family> lines (meta device)")
    parser.add_argument("--measure", choices=FAMILIES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--measure-out", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]] | None:
    args = parse_args(argv)
    if args.measure:
        args.measure_out.write_text(json.dumps(measure_family(args)))
        return None
    return run(args)


if __name__ == "__main__":
    run_cli(main)
