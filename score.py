"""Score generated images with the competition metric (face / CLIP image / CLIP text).

    python score.py [--dataset ./train_data/] [--prompts ./eval_prompts/] [--outputs ./outputs/]
    python score.py --prompts ./eval_prompts_advance/            # advanced split, detected from the file names
    python score.py --face_backend dlib --tasks girl1            # offline face model, one subject

Prints the per-task means and the summary dict; writes outputs/score_results.{json,csv} and
outputs/score_report.html (reference photos, every generated image and its three scores).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from libs.errors import run_cli
from libs.face import BACKENDS, INSIGHTFACE_ROOT
from libs.scoring import DEFAULT_TASKS, REPORT_HTML, RESULTS_CSV, RESULTS_JSON, ScoreResult, score_outputs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="./train_data/", help="folder of <name>/ reference photo folders")
    parser.add_argument("--prompts", default="./eval_prompts/", help="folder of <name>.json (or <name>_sim/_edit.json) prompt lists")
    parser.add_argument("--outputs", default="./outputs/", help="folder of <task>/{prompt}-{idx:03}.jpg; reports are written here")
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help="subjects to score (default: %(default)s)")
    parser.add_argument("--advanced", action="store_true",
                        help="score <name>_sim and <name>_edit (automatic when only those prompt files exist)")
    parser.add_argument("--face_backend", default="insightface", choices=[*BACKENDS, "auto"],
                        help="insightface = the competition's; dlib works offline but is not comparable; "
                             "auto = insightface when its models are installed")
    parser.add_argument("--insightface_root", default=INSIGHTFACE_ROOT, help="folder holding models/buffalo_l/*.onnx")
    parser.add_argument("--clip_model", default=None,
                        help="CLIP ViT-B/32 folder or hub id (default: the config's paths.clip_img, else clip_img_hub)")
    parser.add_argument("--config", default="unidiffuser_v1", help="config name or path (model locations)")
    parser.add_argument("--device", default="auto", help="torch device for CLIP (auto = cuda when available)")
    return parser.parse_args(argv)


def print_result(result: ScoreResult) -> None:
    for name, task in result.tasks.items():
        print(f"{name:12s} face {task.face:.4f}  clip_img {task.clip_img:.4f}  clip_text {task.clip_text:.4f}  "
              f"faces {task.face_detection_rate:.0%}  ref faces {task.reference_faces}/{len(task.references)}  "
              f"missing {len(task.missing)}")
    if not result.comparable_with_competition:
        print(f"NOTE: face scores come from the {result.face_backend} backend and are not comparable with competition numbers")
    print(result.summary)


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The scorer's warnings are for people: one line each, no source location."""
    print(f"WARNING: {message}", file=sys.stderr)


def main(args: argparse.Namespace) -> ScoreResult:
    with warnings.catch_warnings():
        warnings.showwarning = _print_warning
        warnings.filterwarnings("ignore", category=FutureWarning, module="insightface")  # its skimage deprecation
        result = score_outputs(args.dataset, args.prompts, args.outputs, tasks=args.tasks,
                               advanced=True if args.advanced else None, face_backend=args.face_backend,
                               clip_model=args.clip_model, device=args.device, config=args.config,
                               insightface_root=args.insightface_root)
    print_result(result)
    print(f"reports: {Path(args.outputs) / REPORT_HTML} (+ {RESULTS_JSON}, {RESULTS_CSV})")
    return result


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
