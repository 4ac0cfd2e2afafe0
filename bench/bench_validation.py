"""What metric validation costs a training run: one validation against one training step, measured in the same
run, and projected onto the config's schedule.

    python -m bench.bench_validation --size small --threads 1     # CPU
    python -m bench.bench_validation --size full                  # GPU

Configurations
  train_step   one optimizer step as train.py runs it (bench_training's `default` mode)
  validation   one call of libs.train.validation.Validation at a validated step, as train.py makes it: the
               fixed-noise loss, the validation set (config: 2 sim + 4 edit prompts x 1 image, 20 solver
               steps) rendered in batches, written as JPEGs, read back and scored by the real MetricScorer
               (face backend auto: insightface when buffalo_l is installed, else dlib; the scorer's CLIP a
               random model of ViT-B/32's image-tower size), logged, drawn, the best step's tensors kept

The photos are synthetic (no faces: the face detector still runs on every image). Projection, onto the
default config's schedule (train_step 500, validation_steps 125): validations = every validation_steps and
the last (4); overhead = validations x the validation's
median / (train_step x the step's median). The validation's render and scoring seconds come from the
run log's `validation_render_s` / `validation_score_s` (the rest is the fixed-noise loss, files and plot).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from bench.bench_training import CLASS_WORD, DEFAULT, TOKEN, TrainStep, synthetic_images, train_dtype
from bench.common import (bench_config, common_parser, fmt_float, fmt_str, gib, interleaved_runs, median, print_table,
                          random_checkpoints, size_summary, start, timing_fields, write_result, write_scorer_clip)
from libs.config import DEFAULT_CONFIG, load_config
from libs.errors import run_cli
from libs.prompts import fill_prompt
from libs.train import MetricScorer, Plan, RunLog, Selection, build_data, build_models
from libs.train.validation import Validation

BENCH = "bench_validation"
BENCH_PHOTOS = 4


@dataclass
class OneProcess:
    """The part of an accelerate.Accelerator that Validation uses, for one process on a chosen device."""

    device: torch.device
    is_main_process: bool = True

    def print(self, *args: Any) -> None:
        print(*args, flush=True)

    def wait_for_everyone(self) -> None:
        pass


def validations_per_run(train_step: int, validation_steps: int) -> int:
    """Metric validations of a run: every `validation_steps` and the last step (train.py's schedule; step 0 has
    the fixed-noise loss only)."""
    return len({train_step, *range(validation_steps, train_step + 1, validation_steps)})


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = start(args)
    config = bench_config(args.size)
    cfg = config.train
    # the recipe's 4 instance + 4 class views as 8 instance views (the step's compute; no class set needed)
    cfg.update(batch_size=args.batch_size or cfg.batch_size + cfg.class_batch_size, class_batch_size=0,
               with_prior_preservation=False, validation_face_backend=args.face_backend)
    schedule = load_config(DEFAULT_CONFIG).train  # projected onto the real schedule (tiny's has no validation)
    cfg.update(train_step=int(schedule.train_step), validation_steps=int(schedule.validation_steps))
    if args.sample_steps:
        cfg.validation_sample_steps = args.sample_steps
    dtype = train_dtype(DEFAULT, device)
    with random_checkpoints(config) as config, tempfile.TemporaryDirectory(prefix="bench_validation_") as tmp:
        photos = Path(tmp) / "photos" / "boy1"
        photos.mkdir(parents=True)
        instance = synthetic_images(BENCH_PHOTOS, config.resolution, seed=1)
        for image in instance:
            image.image.save(photos / image.path.name)
        out = Path(tmp) / "out"
        plan = Plan(config, photos, out, CLASS_WORD, TOKEN, CLASS_WORD, fill_prompt(cfg.instance_prompt, TOKEN,
                                                                                     CLASS_WORD), None)
        models = build_models(plan, device, dtype)
        data = build_data(plan, instance, None, models, device, True)
        scorer_config = copy.deepcopy(config)
        scorer_config.paths.clip_img = str(write_scorer_clip(Path(tmp) / "scorer_clip", config.bench_clip))
        scorer = MetricScorer(scorer_config, cfg.validation_face_backend, str(device))
        run_log = RunLog(out, True, 0)
        validation = Validation(plan, models.model, models.autoencoder, dtype, data, run_log,
                                OneProcess(device), scorer, Selection(out, "best", cfg.objective))
        validated = itertools.count(1)
        runs = {"train_step": TrainStep(DEFAULT, models, data, cfg, device, int(config.seed)),
                "validation": lambda: validation(next(validated))}
        measured = interleaved_runs(runs, device, args.repeats, args.warmup)
        run_log.close()
        logged = [json.loads(line) for line in run_log.path.read_text().splitlines()][args.warmup:]
    step_s, validation_s = measured["train_step"].times, measured["validation"].times
    count = validations_per_run(int(cfg.train_step), int(cfg.validation_steps))
    images = (len(cfg.validation_sim_prompts) + len(cfg.validation_edit_prompts)) * int(cfg.validation_images)
    sizes = {**size_summary(config), "batch_size": int(cfg.batch_size), "train_step": int(cfg.train_step),
             "validation_steps": int(cfg.validation_steps), "validation_images": images,
             "validation_sample_steps": int(cfg.validation_sample_steps),
             "validation_batch_size": int(cfg.validation_batch_size)}
    rows = []
    for name in ("train_step", "validation"):
        record = {"config": name, "size": args.size, "sizes": sizes, "dtype": str(dtype).removeprefix("torch."),
                  **timing_fields(measured[name], args.repeats, args.warmup),
                  "speedup_vs_baseline": median(step_s) / median(measured[name].times)}
        rows.append(record)
    rows[1].update(face_backend=scorer.face_backend,
                   render_s=median([line["validation_render_s"] for line in logged]),
                   score_s=median([line["validation_score_s"] for line in logged]),
                   validation_in_steps=median(validation_s) / median(step_s), validations_per_run=count,
                   projected_train_s=int(cfg.train_step) * median(step_s),
                   projected_validation_s=count * median(validation_s))
    rows[1]["overhead_fraction"] = rows[1]["projected_validation_s"] / rows[1]["projected_train_s"]
    rows[1]["metric_overhead_fraction"] = count * (rows[1]["render_s"] + rows[1]["score_s"]) / rows[1]["projected_train_s"]
    rows = [write_result(args.results_dir, BENCH, record, device) for record in rows]
    print(f"{BENCH} size={args.size} batch={cfg.batch_size} train_step={cfg.train_step} validation_steps="
          f"{cfg.validation_steps} ({count} validations of {images} images x {cfg.validation_sample_steps} solver "
          f"steps) device={rows[0]['device_name']} face={scorer.face_backend}")
    print_table(rows, [("config", "config", fmt_str), ("median s", "median_s", fmt_float(3)),
                       ("render s", "render_s", fmt_float(2)), ("score s", "score_s", fmt_float(2)),
                       ("in steps", "validation_in_steps", fmt_float(1)),
                       ("overhead", "overhead_fraction", fmt_float(3)), ("work GiB", "working_mem_bytes", gib)])
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = common_parser(__doc__)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="views per step (default: the config's batch_size + class_batch_size, 4 + 4)")
    parser.add_argument("--sample-steps", type=int, default=None, help="validation solver steps (config: 20)")
    parser.add_argument("--face-backend", default="auto", help="validation_face_backend (auto, insightface, dlib, none)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    return run(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
