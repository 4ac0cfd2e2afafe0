"""Score generated images with the competition metric (face / CLIP image / CLIP text).

    python score.py                                   # whatever was rendered: the advanced split
                                                      # (eval_prompts_advance/ + outputs/<name>_sim|_edit),
                                                      # the preliminary one (eval_prompts/ + outputs/<name>), or both
    python score.py --prompts ./eval_prompts_advance/  # one prompt folder; its split detected from the file names
    python score.py --face_backend dlib --tasks girl1  # offline face model, one subject

Prints the per-task means and, last, the summary dict (one per split, each after its label line, when
both were scored); writes outputs/score_results.{json,csv} and outputs/score_report.html (reference
photos, every generated image and its three scores).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import TYPE_CHECKING

from libs.config import DEFAULT_CONFIG
from libs.errors import run_cli
from libs.face import BACKENDS, INSIGHTFACE_ROOT
from libs.outputs import check_output_folder
from libs.layout import ADVANCED, DEFAULT_PROMPT_ROOTS, PRELIMINARY, SUBJECTS

if TYPE_CHECKING:
    from libs.score.results import ScoreResult


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="./train_data/", help="folder of <name>/ reference photo folders")
    parser.add_argument("--prompts", default=None,
                        help="folder of <name>.json (or <name>_sim/_edit.json) prompt lists (default: score every "
                             f"rendered split: {DEFAULT_PROMPT_ROOTS[PRELIMINARY]} and "
                             f"{DEFAULT_PROMPT_ROOTS[ADVANCED]} with their folders in --outputs)")
    parser.add_argument("--outputs", default="./outputs/", help="folder of <task>/{prompt}-{idx:03}.jpg; reports are written here")
    parser.add_argument("--model_output", default=None,
                        help="folder of <name>/ personalizations whose run reports the score report links "
                             "(default: model_output/ beside --outputs)")
    parser.add_argument("--tasks", nargs="+", default=list(SUBJECTS), help="subjects to score (default: %(default)s)")
    parser.add_argument("--advanced", action="store_true",
                        help=f"score <name>_sim and <name>_edit from --prompts (default {DEFAULT_PROMPT_ROOTS[PRELIMINARY]}; "
                             "automatic when only those prompt files exist)")
    parser.add_argument("--face_backend", default="insightface", choices=[*BACKENDS, "auto"],
                        help="insightface = the competition's; dlib works offline but is not comparable; "
                             "auto = insightface when its models are installed")
    parser.add_argument("--insightface_root", default=INSIGHTFACE_ROOT, help="folder holding models/buffalo_l/*.onnx")
    parser.add_argument("--clip_model", default=None,
                        help="CLIP ViT-B/32 folder or hub id (default: the config's paths.clip_img, else clip_img_hub)")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="config name or path (model locations)")
    parser.add_argument("--device", default="auto", help="torch device for CLIP (auto = cuda when available)")
    return parser.parse_args(argv)


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The scorer's warnings are for people: one line each, no source location."""
    print(f"WARNING: {message}", file=sys.stderr)


def main(args: argparse.Namespace) -> list[ScoreResult]:
    check_output_folder(args.outputs, "--outputs (where the reports are written)")
    from libs.score.report import check_report_files, summary_lines, task_lines, write_reports  # torch, transformers
    from libs.score.scorer import Scorer, detect_runs, plan_run

    check_report_files(args.outputs)
    with warnings.catch_warnings():
        warnings.showwarning = _print_warning
        warnings.filterwarnings("ignore", category=FutureWarning, module="insightface")  # its skimage deprecation
        if args.prompts is None and not args.advanced:
            runs = detect_runs(args.dataset, DEFAULT_PROMPT_ROOTS, args.outputs, args.tasks)
        else:
            runs = [plan_run(args.dataset, args.prompts or DEFAULT_PROMPT_ROOTS[PRELIMINARY], args.outputs,
                             args.tasks, advanced=True if args.advanced else None)]
        scorer = Scorer(args.face_backend, clip_model=args.clip_model, device=args.device, config=args.config,
                        insightface_root=args.insightface_root)
        results = [scorer.score_run(run) for run in runs]
    reports = write_reports(results, args.outputs, args.model_output)
    print("\n".join(task_lines(results)))
    print(f"reports: {reports['html']} (+ {reports['json'].name}, {reports['csv'].name})")
    print("\n".join(summary_lines(results, [f"{run.split} split ({run.prompts_dir}/):" for run in runs])))
    return results


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
