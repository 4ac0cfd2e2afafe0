"""How long a graceful stop takes (README "When something goes wrong"): the bound is one training step plus
one checkpoint write, and this bench measures the two parts that a machine without the GPU can measure.

    python -m bench.bench_stop                     # both, the write at full size (what the README quotes)
    python -m bench.bench_stop --parts write       # the full-size checkpoint write only

  write   the checkpoint of a full-size run written through the real writer (libs/train/checkpoints.py,
          synchronous: the stop waits for it): the U-ViT LoRA of the default recipe at `--size` (full: r=32 on
          the default targets, 24,496,128 tensors' values, shapes from the real U-ViT built on the meta device)
          plus the token row, AdamW's state after one step, and an EMA copy (the largest case, --ema_decay > 0),
          all random values on the CPU. `host_copy_s` is the part the training thread waits for in a
          periodic (background) checkpoint.
  signal  SIGTERM to a real train.py process on the tiny world at a step >= 3, until the process has exited
          (it finishes the step, writes its checkpoint, exits 143): tiny steps, so this is the fixed cost.
The step time at full size is not measured here (bench_training.py on a GPU).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from bench.common import (bench_config, common_parser, fmt_float, fmt_str, gib, interleaved_runs, print_table,
                          size_summary, start, timing_fields, write_result)
from libs.config import REPO_ROOT
from libs.errors import run_cli

BENCH = "bench_stop"
PARTS = ("write", "signal")


def trained_state(size: str, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, Any, dict[str, torch.Tensor]]:
    """The trained tensors of the default recipe at `size` (random values), AdamW after one step, its
    schedule and an EMA copy: what a checkpoint of that run holds."""
    from libs.adapters.lora import LoraSpec, add_lora, uvit_lora_modules
    from libs.models.loading import build_uvit
    from libs.train.optim import make_scheduler

    config = bench_config(size)
    nnet = build_uvit(config, torch.device("meta")).requires_grad_(False)
    add_lora(nnet, LoraSpec(r=int(config.train.rank), alpha=float(config.train.alpha),
                            target_modules=uvit_lora_modules(nnet)))
    shapes = {name.replace(".", "__"): param.shape for name, param in nnet.named_parameters() if param.requires_grad}
    shapes["token_row"] = torch.Size([1, int(config.bench_clip.text_hidden)])
    generator = torch.Generator().manual_seed(seed)
    holder = nn.ParameterDict({name: nn.Parameter(torch.randn(shape, generator=generator))
                               for name, shape in shapes.items()})
    optimizer = torch.optim.AdamW(holder.parameters(), lr=float(config.train.lr))
    for param in holder.parameters():
        param.grad = torch.randn(param.shape, generator=generator)
    optimizer.step()
    ema = {name: param.detach().clone() for name, param in holder.named_parameters()}
    return holder, optimizer, make_scheduler(optimizer, config.train), ema


def bench_write(size: str, repeats: int, warmup: int, device: torch.device, results_dir: Path) -> dict[str, Any]:
    from libs.train.checkpoints import CheckpointWriter, _host_copy

    holder, optimizer, scheduler, ema = trained_state(size)
    values = sum(p.numel() for p in holder.parameters())
    with tempfile.TemporaryDirectory(prefix="bench_stop_", dir=os.environ.get("TMPDIR")) as tmp:
        out = Path(tmp)
        writer = CheckpointWriter(background=False)
        step = iter(range(1, 10_000))
        runs = {"host_copy": lambda: _host_copy(holder, optimizer, scheduler, None, ema),
                "write": lambda: writer.save(out, next(step), holder, optimizer, scheduler, None,
                                             {"recipe": {}, "images": []}, 1, ema)}
        measured = interleaved_runs(runs, device, repeats, warmup)
        written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    record = {"config": f"write/{size}", "size": size, "sizes": size_summary(bench_config(size)),
              "trained_values": values, "checkpoint_bytes": written,
              "host_copy_s": timing_fields(measured["host_copy"], repeats, warmup)["median_s"],
              "speedup_vs_baseline": None, **timing_fields(measured["write"], repeats, warmup)}
    return write_result(results_dir, BENCH, record, device)


def _tiny_run(folder: Path) -> list[str]:
    """train.py's command on a tiny world and photos written into `folder` (long enough to be stopped)."""
    from libs.tiny_submission import tiny_world_config
    from libs.tiny_world import build_tiny_world
    from skimage import data
    from PIL import Image

    world = build_tiny_world("tiny", folder / "models")
    config = folder / "config.py"
    config.write_text("from libs.config import load_config\n\n\ndef get_config():\n    config = load_config('tiny')\n"
                      f"    config.paths.update({tiny_world_config(world).paths.to_dict()!r})\n    return config\n")
    photos = folder / "photos"
    photos.mkdir()
    Image.fromarray(data.astronaut()).save(photos / "astronaut.jpg")
    Image.fromarray(data.chelsea()).save(photos / "chelsea.jpg")
    return [sys.executable, str(REPO_ROOT / "train.py"), "--config", str(config), "-d", str(photos),
            "--no_prior_preservation", "--train_step", "100000", "--checkpointing_steps", "100000", "--log_every", "1"]


def _logged_step(out: Path) -> int:
    log = out / "logs" / "train_log.jsonl"
    lines = log.read_text().splitlines() if log.is_file() else []
    return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=0)


def stop_once(command: list[str], out: Path) -> float:
    """Seconds from SIGTERM (sent once the run is past step 3) until the process has exited with 143."""
    process = subprocess.Popen([*command, "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        while _logged_step(out) < 3:
            if process.poll() is not None:
                raise RuntimeError(f"train.py ended before the signal: {process.communicate()[1][-2000:]}")
            time.sleep(0.02)
        sent = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=600)
        seconds = time.perf_counter() - sent
    finally:
        if process.poll() is None:
            process.kill()
    if process.returncode != 128 + signal.SIGTERM:
        raise RuntimeError(f"train.py exited {process.returncode} on SIGTERM: {err[-2000:]}")
    return seconds


def bench_signal(repeats: int, warmup: int, device: torch.device, results_dir: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench_stop_") as tmp:
        command = _tiny_run(Path(tmp))
        runs = iter(range(10_000))
        measured = interleaved_runs({"signal": lambda: stop_once(command, Path(tmp) / f"run{next(runs)}")},
                                    device, repeats, warmup)
    latencies = [round(s, 4) for s in measured["signal"].outputs]
    record = {"config": "signal/tiny", "size": "tiny", "sizes": size_summary(bench_config("tiny")),
              "speedup_vs_baseline": None, **timing_fields(measured["signal"], repeats, warmup),
              "median_s": float(sorted(latencies)[len(latencies) // 2]), "times_s": latencies}
    return write_result(results_dir, BENCH, record, device)


def parse_args(argv: Sequence[str] | None = None):
    parser = common_parser(__doc__)
    parser.set_defaults(size="full", device="cpu", warmup=0)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    device = start(args)
    rows = []
    if "write" in args.parts:
        rows.append(bench_write(args.size, args.repeats, args.warmup, device, args.results_dir))
    if "signal" in args.parts:
        rows.append(bench_signal(args.repeats, args.warmup, device, args.results_dir))
    print_table(rows, [("config", "config", fmt_str), ("median s", "median_s", fmt_float(3)),
                       ("host copy s", "host_copy_s", fmt_float(3)),
                       ("checkpoint GiB", "checkpoint_bytes", gib), ("times s", "times_s", fmt_str)])
    return rows


if __name__ == "__main__":
    run_cli(lambda: main())
