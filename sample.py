"""Text-to-image with a personalized UniDiffuser-v1: three images per prompt.

    python sample.py --restore_path model_output/boy1 --prompt_path eval_prompts/boy1.json --output_path outputs/boy1

Writes `{prompt_index}-{idx:03}.jpg` and `grid.jpg` into the output folder and prints exactly one
`finetuned parameters: <int>` line (spec §7).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from libs.config import DEFAULT_CONFIG, apply_overrides, load_config
from libs.errors import run_cli
from libs.prompts import load_prompts
from libs.sample_files import SamplingInputError, check_output_path, sample_prompts
from libs.sampling import CFG_MODES, load_pipeline


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--restore_path", "--weight_dir", dest="restore_path", required=True,
                        help="folder written by train.py -o (or the reference entry's output); "
                             "a folder without a personalization samples the plain base model")
    parser.add_argument("--prompt_path", required=True, help="JSON list of prompts")
    parser.add_argument("--output_path", required=True, help="folder for {prompt_index}-{idx:03}.jpg")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="config name in configs/ or a .py path (tiny: the toy world)")
    parser.add_argument("--nnet_path", default=None, help="base U-ViT checkpoint (default: the config's models/uvit_v1.pth)")
    parser.add_argument("--steps", type=positive_int, default=None, help="solver steps = model evaluations (config: 50)")
    parser.add_argument("--scale", type=float, default=None, help="guidance scale s in cond + s(cond - uncond) (config: 7)")
    parser.add_argument("--cfg_mode", choices=CFG_MODES, default=None, help="unconditional pass (config: true_uncond)")
    parser.add_argument("--seed", type=int, default=None, help="base seed; each image's noise is keyed by it and its indices")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n_samples", type=positive_int, default=None, help="images per prompt (config: 3)")
    parser.add_argument("--batch_size", type=positive_int, default=None, help="images denoised together (config: 3)")
    parser.add_argument("--skip_existing", action="store_true", help="resume: make only the images not yet written")
    parser.add_argument("--no_prompt_rewrite", action="store_true",
                        help="do not insert the trained token before the class word (boy -> <new1> boy)")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    apply_overrides(config, {"paths.nnet": args.nnet_path, "sample.steps": args.steps, "sample.scale": args.scale,
                             "sample.cfg_mode": args.cfg_mode, "sample.n_samples": args.n_samples,
                             "sample.batch_size": args.batch_size, "seed": args.seed})
    prompts = load_prompts(args.prompt_path)
    output_path = check_output_path(args.output_path)
    restore_path = Path(args.restore_path)
    if not restore_path.is_dir():
        raise SamplingInputError(f"restore path {restore_path} is not a folder (pass the -o folder of train.py)")
    pipeline = load_pipeline(config, args.device, restore_path, count_parameters=True)
    print(pipeline.personalization.describe())
    print(f"finetuned parameters: {pipeline.finetuned_parameters}")
    made = sample_prompts(pipeline, prompts, output_path, config.sample.n_samples, config.seed,
                          skip_existing=args.skip_existing, rewrite=not args.no_prompt_rewrite)
    print(f"wrote {made} image(s) for {len(prompts)} prompt(s) to {output_path}")


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
