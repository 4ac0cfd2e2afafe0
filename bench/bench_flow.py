"""The competition flow through the real command lines: train.py for one subject at the config's recipe, then
`sample.py --all` on a competition-shaped prompt file, timed from outside; projected to the four subjects.

    python -m bench.bench_flow --size tiny                                  # CPU, a minute
    python -m bench.bench_flow --size small --train-step 4 --threads 1      # CPU: steps projected to the recipe
    python -m bench.bench_flow --size full --mixed-precision fp16           # GPU: the real thing

A workspace in the competition layout is made in a temporary folder: synthetic photos in train_data/boy1,
a synthetic class set of the recipe's size in class_data/boy, eval_prompts/boy1.json with --prompts
prompts, random model files of --size (bench.common.write_random_checkpoints) and a config file pointing at
them. Then, as subprocesses with the workspace as working folder:
  train   `train.py -d train_data/boy1 -o model_output/boy1 --crop center --log_every 1` (+ --train_step,
          --mixed_precision when given; the crop is centred because synthetic photos hold no face)
  sample  `sample.py --all`: what sample.sh runs, here for the one subject
Every output line is time-stamped as it arrives, so the record splits each wall time:
  train   loop_s (first to last step, from logs/train_log.jsonl), s_per_step (steps after the first),
          overhead_s = wall - steps x s_per_step (start-up, encoding, validation, writing)
  sample  startup_s (spawn to the `finetuned parameters` line: imports, base models, personalization, the
          count), sampling_s (the rest: denoising, decoding, writing, exit)
Projection (`flow/projected`): one subject's training = the measured wall + the recipe's remaining steps at
s_per_step + the mid-run validations of the recipe at the cost of the final one; four subjects' sampling =
imports + 4 x (the rest of the sample wall), an upper bound (the base models load once, not four times).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from bench.common import (Measured, bench_config, common_parser, fmt_float, fmt_str, median, print_table,
                          size_summary, start, timing_fields, write_random_checkpoints, write_result)
from libs.class_images.folder import IMAGES_DIR, write_class_set
from libs.config import REPO_ROOT
from libs.errors import run_cli

BENCH = "bench_flow"
SUBJECT, CLASS_WORD = "boy1", "boy"
SUBJECTS_IN_FLOW = 4
PROMPTS = ("a {c} standing in the wild", "a {c} wearing a suit, oil painting", "a close-up photo of a {c} smiling",
           "a {c} on the beach, watercolor", "a {c} riding a bicycle in the city", "a {c} in a spacesuit on the moon")


def synthetic_photo(rng: np.random.Generator, size: int) -> Image.Image:
    """Smooth random colour fields (no personal data; the encoders do not care what is in them)."""
    return Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)


def make_workspace(config, root: Path, photos: int, prompts: int) -> Path:
    """The competition layout under `root` with a config file (returned) pointing at random model files."""
    rng = np.random.default_rng(0)
    photo_dir = root / "train_data" / SUBJECT
    photo_dir.mkdir(parents=True)
    for i in range(photos):
        synthetic_photo(rng, config.resolution).save(photo_dir / f"{i:02d}.jpg", quality=95)
    class_dir = root / "class_data" / CLASS_WORD
    (class_dir / IMAGES_DIR).mkdir(parents=True)
    names = [f"{i:04d}.jpg" for i in range(int(config.train.num_class_images))]
    for name in names:
        synthetic_photo(rng, config.resolution).save(class_dir / IMAGES_DIR / name, quality=95)
    write_class_set(class_dir, names, [f"a photo of a {CLASS_WORD}"] * len(names), {"source": "bench_flow"})
    (root / "eval_prompts").mkdir()
    chosen = [PROMPTS[i % len(PROMPTS)].format(c=CLASS_WORD) for i in range(prompts)]
    (root / "eval_prompts" / f"{SUBJECT}.json").write_text(json.dumps(chosen))
    config = write_random_checkpoints(config, root / "models")
    config.train.class_data_dir = str(root / "class_data" / "{class_word}")
    config_file = root / "bench_flow_config.py"
    config_file.write_text("import json\n\nimport ml_collections\n\n\ndef get_config():\n"
                           f"    return ml_collections.ConfigDict(json.loads({config.to_json()!r}))\n")
    return config_file


def timed_run(command: list[str], cwd: Path, threads: int | None) -> tuple[float, list[tuple[float, str]]]:
    """Run `command`; its wall seconds and every output line (stdout and stderr) with the second it came."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": ""}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[tuple[float, str]] = []

    def read(stream) -> None:
        for line in iter(stream.readline, ""):
            lines.append((time.perf_counter() - started, line.rstrip("\n")))

    readers = [threading.Thread(target=read, args=(stream,)) for stream in (process.stdout, process.stderr)]
    for reader in readers:
        reader.start()
    code = process.wait()
    for reader in readers:
        reader.join()
    wall = time.perf_counter() - started
    if code != 0:
        tail = "\n".join(line for _, line in lines[-40:])
        raise RuntimeError(f"{' '.join(command)} failed ({code}):\n{tail}")
    return wall, sorted(lines)


def first_time(lines: list[tuple[float, str]], prefix: str) -> float:
    return next(t for t, line in lines if line.startswith(prefix))


def train_split(out_dir: Path, wall: float) -> dict[str, float]:
    """Loop time and seconds per step from the run's log, the final validation's cost from its summary."""
    log = [json.loads(line) for line in (out_dir / "logs" / "train_log.jsonl").read_text().splitlines()]
    steps = [(entry["step"], entry["elapsed_s"]) for entry in log if "elapsed_s" in entry and "loss" in entry]
    first, last = steps[0], steps[-1]
    per_step = (last[1] - first[1]) / (last[0] - first[0]) if last[0] > first[0] else last[1] - first[1]
    loop = last[1] - first[1] + per_step  # the first step counted at the rate of the others
    return {"steps": last[0], "s_per_step": per_step, "loop_s": loop, "last_step_elapsed_s": last[1],
            "overhead_s": wall - last[0] * per_step}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = start(args)
    config = bench_config(args.size)
    recipe_steps = int(config.train.train_step)
    validation_steps = int(config.train.validation_steps)
    found = {name: Measured([], {}, [], []) for name in ("train", "sample")}
    with tempfile.TemporaryDirectory(prefix="bench_flow_") as tmp:
        root = Path(tmp)
        config_file = make_workspace(config, root, args.photos, args.prompts)
        train_command = [sys.executable, str(REPO_ROOT / "train.py"), "-d", f"train_data/{SUBJECT}", "-o",
                         f"model_output/{SUBJECT}", "--config", str(config_file), "--crop", "center",
                         "--log_every", "1", "--overwrite"]
        if args.train_step:
            train_command += ["--train_step", str(args.train_step)]
        if args.mixed_precision:
            train_command += ["--mixed_precision", args.mixed_precision]
        sample_command = [sys.executable, str(REPO_ROOT / "sample.py"), "--all", "--config", str(config_file),
                          "--device", str(device)]
        for repeat in range(args.repeats):
            wall, lines = timed_run(train_command, root, args.threads)
            found["train"].times.append(wall)
            found["train"].outputs.append({**train_split(root / "model_output" / SUBJECT, wall),
                                           "summary_s": _summary_seconds(lines)})
            print(f"  [{repeat + 1}/{args.repeats}] train: {wall:.1f} s", flush=True)
            for image in (root / "outputs").rglob("*.jpg") if (root / "outputs").is_dir() else []:
                image.unlink()
            wall, lines = timed_run(sample_command, root, args.threads)
            found["sample"].times.append(wall)
            found["sample"].outputs.append({"imports_s": first_time(lines, "found "),
                                            "startup_s": first_time(lines, "finetuned parameters:"),
                                            "images": len(list((root / "outputs" / SUBJECT).glob("*-*.jpg")))})
            print(f"  [{repeat + 1}/{args.repeats}] sample: {wall:.1f} s", flush=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    memory = {"peak_mem_bytes": peak, "mem_base_bytes": 0, "mem_kind": "children_max_rss"}
    rows = []
    train_wall, sample_wall = median(found["train"].times), median(found["sample"].times)
    split = {key: median([out[key] for out in found["train"].outputs]) for key in found["train"].outputs[0]}
    done_steps = int(split["steps"])
    final_validation = max(0.0, split["summary_s"] - split["last_step_elapsed_s"]) if split["summary_s"] else 0.0
    mid_validations = _mid_validations(recipe_steps, validation_steps) - _mid_validations(done_steps, validation_steps)
    train_subject = train_wall + (recipe_steps - done_steps) * split["s_per_step"] + mid_validations * final_validation
    sample_split = {key: median([out[key] for out in found["sample"].outputs]) for key in ("imports_s", "startup_s")}
    sample_four = sample_split["imports_s"] + SUBJECTS_IN_FLOW * (sample_wall - sample_split["imports_s"])
    common = {"size": args.size, "sizes": {**size_summary(config), "photos": args.photos, "prompts": args.prompts,
                                           "recipe_steps": recipe_steps, "class_images": int(config.train.num_class_images)}}
    for name, entry in found.items():
        entry.memory = memory
        record = {"config": name, **common, **timing_fields(entry, args.repeats, 0), "speedup_vs_baseline": 1.0}
        if name == "train":
            record.update(split, mixed_precision=args.mixed_precision or "accelerate default",
                          final_validation_s=final_validation, projected_subject_s=train_subject)
        else:
            record.update(sample_split, sampling_s=sample_wall - sample_split["startup_s"],
                          images=found["sample"].outputs[-1]["images"])
        rows.append(write_result(args.results_dir, BENCH, record, device))
    flow = Measured([train_subject * SUBJECTS_IN_FLOW + sample_four], memory, [], [])
    record = {"config": "flow/projected", **common, **timing_fields(flow, 1, 0), "speedup_vs_baseline": 1.0,
              "subjects": SUBJECTS_IN_FLOW, "train_s": train_subject * SUBJECTS_IN_FLOW, "sample_s": sample_four}
    rows.append(write_result(args.results_dir, BENCH, record, device))
    print(f"{BENCH} size={args.size} device={rows[0]['device_name']} load average {os.getloadavg()[0]:.2f}")
    print_table(rows, [("run", "config", fmt_str), ("wall s", "median_s", fmt_float(1)),
                       ("overhead s", "overhead_s", fmt_float(1)), ("s/step", "s_per_step", fmt_float(3)),
                       ("start-up s", "startup_s", fmt_float(1)), ("sampling s", "sampling_s", fmt_float(1)),
                       ("subject s (recipe)", "projected_subject_s", fmt_float(1))])
    return rows


def _summary_seconds(lines: list[tuple[float, str]]) -> float | None:
    """train.py's last line: "wrote <dir>: ...; <n> trained parameters; <s>s" (seconds since its models loaded)."""
    for _, line in reversed(lines):
        if line.startswith("wrote ") and line.endswith("s"):
            try:
                return float(line.rsplit("; ", 1)[-1][:-1])
            except ValueError:
                return None
    return None


def _mid_validations(steps: int, every: int) -> int:
    """Validations inside a run of `steps` (train.py validates at multiples of `every`, the last step apart)."""
    return max(0, math.ceil(steps / every) - 1) if every else 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = common_parser(__doc__)
    parser.set_defaults(repeats=1)
    parser.add_argument("--photos", type=int, default=10, help="photos of the subject (the larger subjects have 10)")
    parser.add_argument("--prompts", type=int, default=5, help="prompts in the subject's prompt file")
    parser.add_argument("--train-step", type=int, default=None,
                        help="steps to run (default: the recipe's); the projection scales to the recipe")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None,
                        help="train.py --mixed_precision (default: accelerate's, i.e. fp32 without a config)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    return run(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
