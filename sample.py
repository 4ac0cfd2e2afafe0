"""Text-to-image with a personalized UniDiffuser-v1: three images per prompt.

    python sample.py --restore_path model_output/boy1 --prompt_path eval_prompts/boy1.json --output_path outputs/boy1
    python sample.py --all [--advanced | --preliminary]      # what ./sample.sh runs: every prompt file there is
    python sample.py --all --candidates 4                    # best-of-N: keep the 3 best of 12 by the metric

Writes `{prompt_index}-{idx:03}.jpg` and `grid.jpg` into each output folder and prints exactly one
`finetuned parameters: <int>` line per prompt file (spec §7). With `--all` the base models are loaded
once and every (personalization, prompt file, output folder) run of the working folder follows in
this process: eval_prompts/<name>.json -> outputs/<name>, eval_prompts_advance/<name>_{sim,edit}.json
-> outputs/<name>_{sim,edit}, personalizations from model_output/<name>.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import ml_collections

from libs.config import DEFAULT_CONFIG, apply_overrides, config_path, load_config
from libs.download import SAMPLING_WEIGHTS, ensure_weights
from libs.errors import run_cli
from libs.flags import CONFIG_FLAG, add_config_flags, block_keys, key_comments, overrides, selected_config

if TYPE_CHECKING:
    from libs.sample.runs import SampleRun

# keys outside config.sample that are flags too: flag name -> dotted key
OTHER_KEYS = {"seed": "seed", "nnet_path": "paths.nnet"}


def build_parser(config: ml_collections.ConfigDict) -> argparse.ArgumentParser:
    """The flags; the config-key flags show `config`'s values as their defaults."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    one = parser.add_argument_group("one run (the competition's command line)")
    one.add_argument("--restore_path", "--weight_dir", dest="restore_path",
                     help="folder written by train.py -o (or the reference entry's output)")
    one.add_argument("--prompt_path", help="JSON list of prompts")
    one.add_argument("--output_path", help="folder for {prompt_index}-{idx:03}.jpg")
    every = parser.add_argument_group("every run of the working folder, in one process (./sample.sh)")
    every.add_argument("--all", action="store_true", help="every prompt file under eval_prompts/ and "
                       "eval_prompts_advance/ with its model_output/<name>")
    split = every.add_mutually_exclusive_group()
    split.add_argument("--advanced", dest="split", action="store_const", const="advanced",
                       help="only eval_prompts_advance/<name>_{sim,edit}.json (all 8 must exist)")
    split.add_argument("--preliminary", dest="split", action="store_const", const="preliminary",
                       help="only eval_prompts/<name>.json (all 4 must exist)")
    parser.set_defaults(split="auto")
    parser.add_argument("--base_model", action="store_true",
                        help="sample the plain base model on purpose (no personalization; --restore_path not read)")
    parser.add_argument(CONFIG_FLAG, default=DEFAULT_CONFIG,
                        help="config name in configs/ or a .py path (tiny: the toy world); the settings default to it")
    parser.add_argument("--device", default=None)  # None: cuda when available, else cpu (parse_args)
    settings = parser.add_argument_group("settings", "each sets the config.sample key of its name (--seed: the top-level "
                                         f"key; --nnet_path: paths.nnet); the defaults are the {CONFIG_FLAG} file's values")
    add_config_flags(settings, config, {**OTHER_KEYS, **block_keys(config, "sample")},
                     key_comments(config_path(DEFAULT_CONFIG)))
    parser.add_argument("--skip_existing", action="store_true", help="resume: make only the images not yet written "
                        "(an existing image is kept only if it decodes completely)")
    parser.add_argument("--no_prompt_rewrite", action="store_true",
                        help="do not insert the trained token before the class word (boy -> <new1> boy)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser(load_config(selected_config(argv)))
    args = parser.parse_args(argv)
    single = [args.restore_path, args.prompt_path, args.output_path]
    if args.all and any(single):
        parser.error("--all finds its runs itself: leave out --restore_path, --prompt_path and --output_path")
    if not args.all and not (args.prompt_path and args.output_path and (args.restore_path or args.base_model)):
        parser.error("give --restore_path, --prompt_path and --output_path (or --all, as ./sample.sh does)")
    if args.split != "auto" and not args.all:
        parser.error("--advanced / --preliminary pick the runs of --all")
    if args.device is None:
        import torch  # once the arguments are known to be usable: --help and a usage error load no torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def plan_runs(args: argparse.Namespace) -> list[SampleRun]:
    """The runs to make (those of the working folder with --all), every input checked."""
    from libs.sample.runs import SampleRun, check_runs, discover_runs

    if args.all:
        runs = discover_runs(Path.cwd(), args.split, base_model=args.base_model)
        print(f"found {len(runs)} prompt file(s): "
              + ", ".join(str(run.prompt_path.relative_to(Path.cwd())) for run in runs))
    else:
        restore = None if args.base_model else Path(args.restore_path)
        runs = [SampleRun(restore, Path(args.prompt_path), Path(args.output_path))]
    check_runs(runs)
    return runs


def main(args: argparse.Namespace) -> None:
    from libs.sample.pipeline import resolve_device  # torch, transformers, diffusers: for the run, not for --help
    from libs.sample.rerank import build_reranker
    from libs.sample.runs import render_runs

    config = apply_overrides(load_config(args.config), overrides(args))
    device = resolve_device(args.device)
    ensure_weights(config, SAMPLING_WEIGHTS)  # a missing weight file is named before anything else
    runs = plan_runs(args)
    reranker = build_reranker(config, runs, device, all_runs=args.all)  # None without --candidates N > 1
    render_runs(config, device, runs, skip_existing=args.skip_existing, rewrite=not args.no_prompt_rewrite,
                announce=args.all, reranker=reranker)
    if args.all:
        print(f"sample.py: all {len(runs)} run(s) finished")


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
