"""The fidelity guard: how far the sampler's low-precision U-ViT is from fp32, against the official path's
distance, on the same random weights and inputs. Speed may not be bought with fidelity: every output of
`ours` must stay within GUARD (1.5x) of the official fp16 path's relative error against fp32.

    python -m bench.bench_fidelity --size full                   # GPU: fp16, the official dtype
    python -m bench.bench_fidelity --size small --threads 1      # CPU: bf16 (what tests/test_bench.py checks)

Paths (a U-ViT with a LoRA of --lora-rank on the default targets, random B; one forward of --batch samples):
  reference        fp32 weights, LoRA unmerged, fp32 compute
  official         fp32 weights, LoRA unmerged, under autocast(dtype): the official script's path
  ours             sample.py's: a weight-sharing copy, LoRA merged and placed for inference
                   (libs.adapters.lora.merge_lora -> libs.precision.place_for_inference), under autocast(dtype)
  ours_cast_all    as ours, but every tensor cast to dtype (normalization weights too): what keeping the
                   norms in fp32 buys
  ours_compiled    ours with regional compilation (UViT.compile_blocks); opt-in (--compile)
Relative error = ||out - reference|| / ||reference|| for each output (img, clip_img, text); `guard_ratio`
= ours' error / the official's, per output. The official init leaves LayerNorm at weight 1 and bias 0,
which every dtype holds exactly; a trained model's norms are not, so they are drawn from N(1, 0.1) and
N(0, 0.02) (--init-norms keeps the init's).
"""
from __future__ import annotations

import argparse
from typing import Any, Sequence

import torch
from torch import nn

from bench.common import (DTYPES, autocast, bench_config, common_parser, fmt_float, fmt_str, interleaved_runs,
                          print_table, size_summary, start, timing_fields, uvit_inputs, write_result)
from libs.adapters.lora import LoraSpec, add_lora, merge_lora, uvit_lora_modules
from libs.errors import run_cli
from libs.models.loading import build_uvit
from libs.sample.pipeline import weight_sharing_copy

BENCH = "bench_fidelity"
GUARD = 1.5
OUTPUTS = ("img", "clip_img", "text")


def trained_looking_uvit(config, rank: int, init_norms: bool, device: torch.device, seed: int = 0) -> nn.Module:
    """A random U-ViT with a LoRA (random B, so the adapters change the output) and, unless `init_norms`,
    LayerNorm weights and biases away from the init's exact 1 and 0."""
    torch.manual_seed(seed)
    nnet = build_uvit(config, device).eval().requires_grad_(False)
    add_lora(nnet, LoraSpec(r=rank, alpha=float(rank), target_modules=uvit_lora_modules(nnet)))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in nnet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        if not init_norms:
            for module in nnet.modules():
                if isinstance(module, nn.LayerNorm):
                    module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=generator))
                    module.bias.copy_(0.02 * torch.randn(module.bias.shape, generator=generator))
    return nnet.requires_grad_(False)


def relative_errors(outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> dict[str, float]:
    return {name: float((out.float() - ref.float()).norm() / ref.float().norm())
            for name, out, ref in zip(OUTPUTS, outputs, reference)}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = start(args)
    dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "bf16")]
    config = bench_config(args.size)
    nnet = trained_looking_uvit(config, args.lora_rank, args.init_norms, device)
    inputs = uvit_inputs(config, args.batch, device, torch.Generator().manual_seed(0))
    ours = weight_sharing_copy(nnet)
    merge_lora(ours, "bench", device, dtype)
    cast_all = weight_sharing_copy(nnet)
    merge_lora(cast_all, "bench", device, dtype)
    cast_all.to(dtype)  # the normalization weights too
    models = {"reference": (nnet, torch.float32), "official": (nnet, dtype), "ours": (ours, dtype),
              "ours_cast_all": (cast_all, dtype)}
    if args.compile:
        compiled = weight_sharing_copy(ours)
        compiled.compile_blocks()
        models["ours_compiled"] = (compiled, dtype)

    def forward(model: nn.Module, compute: torch.dtype):
        def call() -> tuple[torch.Tensor, ...]:
            with torch.inference_mode(), autocast(device, compute):
                return tuple(out.float() for out in model(*inputs))
        return call

    measured = interleaved_runs({name: forward(*spec) for name, spec in models.items()}, device, args.repeats,
                                args.warmup)
    reference = measured["reference"].outputs[-1]
    errors = {name: relative_errors(entry.outputs[-1], reference) for name, entry in measured.items()}
    rows = []
    for name, entry in measured.items():
        ratio = {out: errors[name][out] / errors["official"][out] if errors["official"][out] else None
                 for out in OUTPUTS}
        record = {"config": name, "size": args.size, "sizes": {**size_summary(config), "batch": args.batch,
                                                              "lora_rank": args.lora_rank},
                  "dtype": str(models[name][1]).removeprefix("torch."), "init_norms": args.init_norms,
                  "rel_error": errors[name], "guard_ratio": ratio, "guard": GUARD,
                  "within_guard": all(r is not None and r <= GUARD for r in ratio.values()),
                  **timing_fields(entry, args.repeats, args.warmup)}
        record["speedup_vs_baseline"] = measured["official"].times[-1] / record["median_s"]
        rows.append(write_result(args.results_dir, BENCH, record, device))
    print(f"{BENCH} size={args.size} dtype={str(dtype).removeprefix('torch.')} device={rows[0]['device_name']} "
          f"torch={torch.__version__}")
    print_table(rows, [("path", "config", fmt_str), ("dtype", "dtype", fmt_str),
                       *((f"err {o}", "rel_error", lambda e, o=o: f"{e[o]:.3e}") for o in OUTPUTS),
                       *((f"x official {o}", "guard_ratio", lambda r, o=o: "-" if r[o] is None else f"{r[o]:.3f}")
                         for o in OUTPUTS),
                       ("s", "median_s", fmt_float(3))])
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = common_parser(__doc__)
    parser.set_defaults(repeats=1, warmup=0)
    parser.add_argument("--dtype", choices=("fp16", "bf16"), default=None,
                        help="low-precision dtype (default: fp16 on CUDA, the official; bf16 on CPU)")
    parser.add_argument("--batch", type=int, default=2, help="samples per forward")
    parser.add_argument("--lora-rank", type=int, default=32, help="rank of the LoRA (the recipe's 32)")
    parser.add_argument("--init-norms", action="store_true", help="keep the init's LayerNorm weights 1 and biases 0")
    parser.add_argument("--compile", action="store_true", help="also ours with regional compilation")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    return run(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
