"""Personalize UniDiffuser-v1 to one subject: a new token, a U-ViT LoRA and DreamBooth prior preservation.

    accelerate launch --mixed_precision fp16 --num_processes 1 train.py -d train_data/boy1 -o model_output/boy1
    python train.py -d train_data/boy1 -o model_output/boy1 --no_prior_preservation --train_step 300
    python train.py -d train_data/boy1 -o model_output/boy1 --auto_recipe     # a budgeted search over recipes

Every key of `config.train` in the config file (configs/unidiffuser_v1.py) is a flag of the same name,
with the key's comment as its help and the config's value as its default. The output folder gets what
sample.py reads (personalization.json, uvit_lora.safetensors, token_embeddings.safetensors): the adapters
of the validated step that scores best on the competition metric (--selection last: the last step's),
train_config.json, logs/ and validation/ (images, grids and curves.png).
"""
from __future__ import annotations

import argparse
from typing import Sequence

import ml_collections

from libs.config import DEFAULT_CONFIG, apply_overrides, config_path, load_config
from libs.errors import run_cli
from libs.flags import CONFIG_FLAG, add_config_flags, block_keys, key_comments, overrides, selected_config
from libs.adapters.targets import LORA_TARGETS
from libs.train.recipes import RECIPES
from libs.train_output import check_output

# keys outside config.train that are flags too: flag name -> dotted key
OTHER_KEYS = {"seed": "seed", "resolution": "resolution", "nnet_path": "paths.nnet"}
# the reference entry's and earlier spellings that are not `--key` / `--no_key`
ALIASES = {"train.with_prior_preservation": ("--no_prior_preservation",)}


def build_parser(config: ml_collections.ConfigDict) -> argparse.ArgumentParser:
    """The flags; the config-key flags show `config`'s values as their defaults."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = parser.add_argument_group("run")
    run.add_argument("-d", "--data", "--instance_data_dir", dest="data", required=True, help="folder of subject photos")
    run.add_argument("-o", "--outdir", dest="outdir", required=True, help="output folder (sample.py --restore_path)")
    run.add_argument(CONFIG_FLAG, default=DEFAULT_CONFIG,
                     help="config name in configs/ or a .py path; the flags below default to its values")
    run.add_argument("--resume", default=None, metavar="latest|DIR", help="continue from the last (or this) checkpoint")
    run.add_argument("--overwrite", action="store_true", help="replace a finished personalization in -o")
    run.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                     help="default: what `accelerate launch` / `accelerate config` says, else no")
    choices = {"train.lora_targets": LORA_TARGETS,
               "train.auto_recipes": tuple(recipe.name for recipe in RECIPES)}
    comments = key_comments(config_path(DEFAULT_CONFIG))
    settings = parser.add_argument_group(
        "settings", "each sets the config.train key of its name (--seed, --resolution: the top-level keys;\n"
                    f"--nnet_path: paths.nnet); the defaults are the {CONFIG_FLAG} file's values")
    add_config_flags(settings, config, {**OTHER_KEYS, **block_keys(config, "train")}, comments, choices, ALIASES)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser(load_config(selected_config(argv))).parse_args(argv)


def config_from_args(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """The config file with every given flag applied."""
    return apply_overrides(load_config(args.config), overrides(args))


def main(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    check_output(args.outdir)  # a refused -o is named before torch, peft and diffusers load (for the run alone)
    from libs.train import run_auto_recipe, train

    run = run_auto_recipe if config.train.auto_recipe else train
    run(config, args.data, args.outdir, resume=args.resume, overwrite=args.overwrite,
        mixed_precision=args.mixed_precision)


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
