"""Start-up of sample.py and train.py (interpreter start to the first step, every model loaded), phase by
phase, for this checkout and optionally an older revision, interleaved in one run so the ratio is fair.

    python -m bench.bench_startup --size full --before 6b9f361 --threads 1     # CPU, ~5 GB of model files
    python -m bench.bench_startup --size full --device cuda                    # GPU

Each timed run is a fresh process (bench/startup_probe.py) over the same model files, so the page cache is
warm after the warm-up runs (the issue's "start-up with a warm page cache"):
  sample  `import sample` (all sample.py imports), libs.sample.pipeline.load_base, personalize(count_parameters=True):
          a personalization of the config's LoRA rank with a token applied, counted (spec §7), merged and
          placed on the device (`merge`: the merge_lora calls, reported apart: on a CPU the merge makes
          3.5 GB of new fp32 weights and dominates, on a GPU it runs on the device); the count it prints must
          agree between revisions
  train   `import train`, accelerate's Accelerator, libs.train.build_models + make_optimizer: the models
          train.py trains (encoding the photos, the GPU's work, is bench_training's encode_s_per_view)
median_s is the process's wall time (spawn to exit); `phases` are seconds inside the process. Model files
are random weights in the official formats (bench.common.write_random_checkpoints), written once into
--models-dir (reused when it holds them) or a temporary folder.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Sequence

import torch

from bench.common import (Measured, bench_config, common_parser, fmt_float, fmt_str, gib, median, print_table,
                          size_summary, start, timing_fields, write_personalization, write_random_checkpoints,
                          write_result)
from libs.config import REPO_ROOT
from libs.errors import run_cli

BENCH = "bench_startup"
PROBE = Path(__file__).with_name("startup_probe.py")
PROGRAMS = ("sample", "train")


def checkout_revision(revision: str, folder: Path) -> Path:
    """The files of `revision` (git archive: the repository and its worktrees are not touched)."""
    archive = folder / "rev.tar"
    with open(archive, "wb") as handle:
        subprocess.run(["git", "-C", str(REPO_ROOT), "archive", "--format=tar", revision], stdout=handle, check=True)
    target = folder / "checkout"
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    return target


def model_files(config, folder: Path) -> tuple[Any, Path]:
    """The config pointing at random model files in `folder` (written unless a previous run left them there)
    and a personalization folder beside them."""
    marker = folder / "bench_config.json"
    restore = folder / "personalization"
    if marker.is_file() and (restore / "personalization.json").is_file():
        import ml_collections

        return ml_collections.ConfigDict(json.loads(marker.read_text())), restore
    print(f"writing random {config.name} model files to {folder} ...", flush=True)
    config = write_random_checkpoints(config, folder)
    write_personalization(config, restore)
    marker.write_text(config.to_json())
    return config, restore


def probe(checkout: Path, program: str, config_file: Path, restore: Path, args: argparse.Namespace,
          device: torch.device) -> dict[str, Any]:
    command = [sys.executable, str(PROBE), "--repo", str(checkout), "--program", program, "--config",
               str(config_file), "--restore", str(restore), "--device", str(device), "--dtype", args.dtype]
    if args.threads:
        command += ["--threads", str(args.threads)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    wall = time.perf_counter() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{program} probe in {checkout} failed:\n{done.stderr[-3000:]}")
    return {**json.loads(lines[-1][len("PROBE "):]), "wall_s": wall}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = start(args)
    args.dtype = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    config = bench_config(args.size)
    with ExitStack() as stack:
        models_dir = args.models_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_models_")))
        models_dir.mkdir(parents=True, exist_ok=True)
        config, restore = model_files(config, models_dir)
        config_file = models_dir / "bench_config.json"
        checkouts = {"after": REPO_ROOT}
        if args.before:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_startup_")))
            checkouts = {"before": checkout_revision(args.before, tmp), **checkouts}
        runs = [(program, label) for program in args.programs for label in checkouts]
        found = {run: Measured([], {}, [], []) for run in runs}
        for program, label in runs:
            for _ in range(args.warmup):
                result = probe(checkouts[label], program, config_file, restore, args, device)
                found[(program, label)].warmup_times.append(result["wall_s"])
                print(f"  warm-up {program}/{label}: {result['wall_s']:.2f} s", flush=True)
        for repeat in range(args.repeats):
            for program, label in runs:
                result = probe(checkouts[label], program, config_file, restore, args, device)
                entry = found[(program, label)]
                entry.times.append(result["wall_s"])
                entry.outputs.append(result)
                peak = result["cuda_peak_bytes"] if device.type == "cuda" else result["peak_rss_bytes"]
                if not entry.memory or peak > entry.memory["peak_mem_bytes"]:
                    entry.memory = {"peak_mem_bytes": peak, "mem_base_bytes": 0 if device.type == "cuda"
                                    else result["rss_after_import_bytes"],
                                    "mem_kind": "cuda_max_allocated" if device.type == "cuda" else "child_peak_rss"}
                print(f"  [{repeat + 1}/{args.repeats}] {program}/{label}: {result['wall_s']:.2f} s "
                      + " ".join(f"{k} {v:.2f}" for k, v in result["phases"].items()), flush=True)
    rows = []
    for program in args.programs:
        baseline = median(found[(program, next(iter(checkouts)))].times)
        for label, checkout in checkouts.items():
            entry = found[(program, label)]
            phases = {name: median([out["phases"][name] for out in entry.outputs]) for name in entry.outputs[0]["phases"]}
            record = {"config": f"{program}/{label}", "size": args.size, "sizes": size_summary(config),
                      "program": program, "revision": args.before if label == "before" else "working tree",
                      "phases_s": phases, "in_process_s": median([out["total_s"] for out in entry.outputs]),
                      "peak_rss_bytes": max(out["peak_rss_bytes"] for out in entry.outputs),
                      **timing_fields(entry, args.repeats, args.warmup)}
            for key in ("finetuned_parameters", "trainable_parameters"):
                if key in entry.outputs[0]:
                    record[key] = entry.outputs[0][key]
            record["speedup_vs_baseline"] = baseline / record["median_s"]
            if program == "train":
                record["dtype"] = args.dtype
            rows.append(write_result(args.results_dir, BENCH, record, device))
    print(f"{BENCH} size={args.size} device={rows[0]['device_name']} torch={torch.__version__} "
          f"load average {os.getloadavg()[0]:.2f}")
    print_table(rows, [("run", "config", fmt_str), ("wall s", "median_s", fmt_float(2)),
                       ("in-process s", "in_process_s", fmt_float(2)),
                       ("phases", "phases_s", lambda p: " ".join(f"{k} {v:.2f}" for k, v in p.items())),
                       ("peak RSS GiB", "peak_rss_bytes", gib), ("x before", "speedup_vs_baseline", fmt_float(2))])
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = common_parser(__doc__)
    parser.add_argument("--before", default=None, metavar="REV",
                        help="also time this git revision (e.g. the commit before a change), interleaved")
    parser.add_argument("--programs", nargs="+", choices=PROGRAMS, default=list(PROGRAMS))
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="keep the random model files here and reuse them (default: a temporary folder)")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                        help="train: the frozen weights' dtype (default: fp16 on CUDA, fp32 elsewhere)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    return run(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
