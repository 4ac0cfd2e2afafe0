"""U-ViT throughput and peak memory: fp32 vs bf16, SDPA vs the official explicit fp32-softmax ("math")
attention, gradient checkpointing on/off.

    python -m bench.bench_uvit --size small            # CPU or CUDA; --size full for the real v1
    python -m bench.bench_uvit --size full --passes fwd --dtypes bf16 --attention sdpa --batch 1

Passes: `fwd` is a sampling forward (inference_mode); `fwd_bwd` a training step's forward and backward
with the weights frozen and gradients taken w.r.t. the inputs: the backward a LoRA fine-tune pays (the
adapters' own gradients are tiny next to it). Weights stay fp32 and bf16/fp16 run under autocast, as
mixed-precision training does (bench_sampling measures the sampler's cast weights). The baseline of each
pass is fp32 + "math" attention without checkpointing, the official code path in fp32; every line
carries its speedup over that baseline. Settings run interleaved (see bench.common.interleaved_runs).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from bench.common import (DTYPES, autocast, bench_config, common_parser, fmt_float, fmt_str, gib,
                          interleaved_runs, median, print_table, size_summary, start,
                          timing_fields, uvit_forward_flops, uvit_inputs, write_result)
from libs.errors import run_cli
from libs.models.loading import build_uvit
from libs.models.uvit import ATTENTION_MODES, UViT

BENCH = "bench_uvit"
PASSES = ("fwd", "fwd_bwd")
DEFAULT_BATCH = {"tiny": 4, "small": 2, "full": 1}


@dataclass(frozen=True)
class Setting:
    pass_name: str
    dtype: str
    attention: str
    checkpointing: bool

    @property
    def name(self) -> str:
        return f"{self.pass_name}/{self.dtype}/{self.attention}" + ("/ckpt" if self.checkpointing else "")

    @property
    def is_baseline(self) -> bool:
        return self.dtype == "fp32" and self.attention == "math" and not self.checkpointing


def settings(passes: Sequence[str], dtypes: Sequence[str], attentions: Sequence[str],
             checkpointing: Sequence[bool]) -> list[Setting]:
    """Every combination plus each pass's baseline (listed first); checkpointing only changes a backward."""
    order = {name: i for i, name in enumerate(DTYPES)}
    found = []
    for pass_name in passes:
        ckpts = sorted(set(checkpointing)) if pass_name == "fwd_bwd" else [False]
        combos = {Setting(pass_name, "fp32", "math", False)}
        combos |= {Setting(pass_name, d, a, c) for d in dtypes for a in attentions for c in ckpts}
        found += sorted(combos, key=lambda s: (not s.is_baseline, order[s.dtype], s.attention, s.checkpointing))
    return found


def make_step(nnet: UViT, setting: Setting, inputs: tuple[torch.Tensor, ...],
              device: torch.device) -> Callable[[], None]:
    """A closure that configures the shared model for `setting` and runs one pass."""
    dtype = DTYPES[setting.dtype]

    def configure() -> None:
        nnet.set_attention_mode(setting.attention)
        nnet.set_gradient_checkpointing(setting.checkpointing)

    def forward() -> None:
        configure()
        with torch.inference_mode(), autocast(device, dtype):
            nnet(*inputs)

    def forward_backward() -> None:
        configure()
        img, clip_img, text = (x.detach().requires_grad_(True) for x in inputs[:3])
        with autocast(device, dtype):
            img_out, clip_out, _ = nnet(img, clip_img, text, *inputs[3:])
            loss = F.mse_loss(img_out.float(), inputs[0]) + F.mse_loss(clip_out.float(), inputs[1])
        loss.backward()

    return forward if setting.pass_name == "fwd" else forward_backward


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = start(args)
    config = bench_config(args.size)
    batch = args.batch or DEFAULT_BATCH[args.size]
    plan = settings(args.passes, args.dtypes, args.attention, [c == "on" for c in args.checkpointing])
    fwd_flops = uvit_forward_flops(config.nnet, batch)
    torch.manual_seed(0)
    nnet = build_uvit(config, device).eval().requires_grad_(False)  # random weights: values do not matter
    inputs = uvit_inputs(config, batch, device, torch.Generator().manual_seed(0))
    measured = interleaved_runs({s.name: make_step(nnet, s, inputs, device) for s in plan},
                                device, args.repeats, args.warmup)
    baselines = {s.pass_name: median(measured[s.name].times) for s in plan if s.is_baseline}
    rows = []
    for setting in plan:
        record = {"config": setting.name, "size": args.size, "sizes": {**size_summary(config), "batch": batch},
                  "pass": setting.pass_name, "dtype": setting.dtype, "attention": setting.attention,
                  "checkpointing": setting.checkpointing, "baseline": setting.is_baseline,
                  **timing_fields(measured[setting.name], args.repeats, args.warmup)}
        model_flops = fwd_flops * (2 if setting.pass_name == "fwd_bwd" else 1)
        record.update(samples_per_s=batch / record["median_s"], model_flops=model_flops,
                      tflops_per_s=model_flops / record["median_s"] / 1e12,
                      speedup_vs_baseline=baselines[setting.pass_name] / record["median_s"])
        rows.append(write_result(args.results_dir, BENCH, record, device))
    print(f"{BENCH} size={args.size} batch={batch} device={rows[0]['device_name']} torch={torch.__version__}")
    print_table(rows, [("config", "config", fmt_str), ("median s", "median_s", fmt_float(4)),
                       ("samples/s", "samples_per_s", fmt_float(2)), ("TFLOP/s", "tflops_per_s", fmt_float(3)),
                       ("peak GiB", "peak_mem_bytes", gib), ("work GiB", "working_mem_bytes", gib),
                       ("x baseline", "speedup_vs_baseline", fmt_float(2))])
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = common_parser(__doc__)
    parser.add_argument("--batch", type=int, default=None, help=f"samples per forward (default {DEFAULT_BATCH})")
    parser.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--attention", nargs="+", choices=ATTENTION_MODES, default=list(ATTENTION_MODES))
    parser.add_argument("--checkpointing", nargs="+", choices=("off", "on"), default=["off", "on"],
                        help="gradient checkpointing settings for fwd_bwd")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    return run(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
