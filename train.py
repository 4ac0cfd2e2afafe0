"""Personalize UniDiffuser-v1 to one subject: a new token, a U-ViT LoRA and DreamBooth prior preservation.

    accelerate launch --mixed_precision fp16 --num_processes 1 train.py -d train_data/boy1 -o model_output/boy1
    python train.py -d train_data/boy1 -o model_output/boy1 --no_prior_preservation --train_step 300

Defaults come from `config.train` in the config file (configs/unidiffuser_v1.py); every flag below
overrides the key of the same name. The output folder gets what sample.py reads (personalization.json,
uvit_lora.safetensors, token_embeddings.safetensors), train_config.json, logs/ and validation/.
"""
from __future__ import annotations

import argparse
from typing import Sequence

import ml_collections

from libs.config import DEFAULT_CONFIG, apply_overrides, load_config
from libs.data import CROP_MODES
from libs.errors import run_cli
from libs.lora import BLOCK_TARGETS, TOP_LEVEL_TARGETS
from libs.training import SCHEDULERS, TEXT_MODES, train

# flag -> config key; flags left out keep the config's value
TOP_LEVEL = {"seed": "seed", "resolution": "resolution", "nnet_path": "paths.nnet"}


def _switch(parser: argparse.ArgumentParser, name: str, help: str, off: str | None = None) -> None:
    """--name / --no_name (or the given `off` spelling), default None = the config's value."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(f"--{name}", dest=name, action="store_true", default=None, help=help)
    group.add_argument(f"--{off or 'no_' + name}", dest=name, action="store_false")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = parser.add_argument_group("run")
    run.add_argument("-d", "--data", "--instance_data_dir", dest="data", required=True, help="folder of subject photos")
    run.add_argument("-o", "--outdir", dest="outdir", required=True, help="output folder (sample.py --restore_path)")
    run.add_argument("--config", default=DEFAULT_CONFIG, help="config name in configs/ or a .py path")
    run.add_argument("--resume", default=None, metavar="latest|DIR", help="continue from the last (or this) checkpoint")
    run.add_argument("--overwrite", action="store_true", help="replace a finished personalization in -o")
    run.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                     help="default: what `accelerate launch` / `accelerate config` says, else no")
    run.add_argument("--seed", type=int)
    run.add_argument("--nnet_path", help="base U-ViT checkpoint")

    subject = parser.add_argument_group("subject and prompts")
    subject.add_argument("--class_word", help='"" = "boy" if the data path contains "boy", else "girl"')
    subject.add_argument("--modifier_token", help="the new word; sample.py puts it before the class word")
    subject.add_argument("--initializer_token", help='word the token starts from; "" = the class word')
    subject.add_argument("--num_vectors", type=int, help="embedding rows of the token")
    subject.add_argument("--instance_prompt", help="{token} and {class_word} are filled in")

    data = parser.add_argument_group("photos")
    data.add_argument("--resolution", type=int, help="training resolution in pixels (multiple of 16)")
    data.add_argument("--crop", choices=CROP_MODES,
                      help="face: around the face (crops.json box, else a detector), else centred")
    _switch(data, "hflip", "mirror images as extra cached views")
    data.add_argument("--min_image_side", type=int)

    prior = parser.add_argument_group("prior preservation")
    _switch(prior, "with_prior_preservation", "class images in every batch", off="no_prior_preservation")
    prior.add_argument("--class_data_dir",
                       help="class set (images/, images.txt, caption.txt); {class_word} is filled in")
    prior.add_argument("--class_prompt", help='one prompt for all class images; "" = the set\'s own captions')
    prior.add_argument("--num_class_images", type=int)
    prior.add_argument("--prior_loss_weight", type=float)
    prior.add_argument("--instance_loss_weight", type=float)
    prior.add_argument("--clip_img_loss_weight", type=float)

    what = parser.add_argument_group("what trains")
    what.add_argument("--text_encoder_mode", choices=TEXT_MODES,
                      help="token: only the new row(s); lora: plus LoRA on CLIP attention; full: plus the whole "
                           "tower; frozen: no token at all")
    what.add_argument("--lora_targets", nargs="+", metavar="NAME",
                      help=f"in the blocks: {' '.join(BLOCK_TARGETS)}; top level: {' '.join(TOP_LEVEL_TARGETS)}")
    what.add_argument("--rank", type=int)
    what.add_argument("--alpha", type=float)
    what.add_argument("--lora_dropout", type=float)
    what.add_argument("--text_lora_rank", type=int)
    what.add_argument("--text_lora_alpha", type=float)

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train_step", type=int, help="optimizer steps")
    optim.add_argument("--batch_size", type=int, help="instance views per step and process")
    optim.add_argument("--class_batch_size", type=int, help="class views per step and process")
    optim.add_argument("--lr", type=float, help="U-ViT LoRA learning rate")
    optim.add_argument("--text_lr", type=float, help="token / text-encoder learning rate")
    optim.add_argument("--weight_decay", type=float)
    optim.add_argument("--lr_scheduler", choices=tuple(SCHEDULERS))
    optim.add_argument("--warmup_steps", type=int)
    optim.add_argument("--max_grad_norm", type=float)

    speed = parser.add_argument_group("speed")
    _switch(speed, "cache_latents", "encode every image once (--no_cache_latents: every step)")
    speed.add_argument("--cache_dir", help="also keep image encodings on disk here")
    speed.add_argument("--encode_batch_size", type=int)
    _switch(speed, "gradient_checkpointing", "recompute U-ViT activations in the backward pass")
    _switch(speed, "compile", "torch.compile the U-ViT")

    logs = parser.add_argument_group("logs, checkpoints, validation")
    logs.add_argument("--log_every", type=int)
    logs.add_argument("--checkpointing_steps", type=int)
    logs.add_argument("--checkpoints_total_limit", type=int)
    _switch(logs, "keep_checkpoints", "keep the last checkpoint after training")
    logs.add_argument("--validation_steps", type=int, help="0 = no validation images")
    logs.add_argument("--validation_prompts", nargs="+", metavar="PROMPT")
    _show_config_defaults(parser)
    return parser


def _show_config_defaults(parser: argparse.ArgumentParser) -> None:
    """The defaults live in the config; write them into --help (for the default config)."""
    config = load_config(DEFAULT_CONFIG)
    for action in parser._actions:
        key = TOP_LEVEL.get(action.dest, f"train.{action.dest}")
        node, *rest = key.split(".")
        value = config.get(node)
        for part in rest:
            value = value.get(part) if value is not None else None
        if value is not None and action.default is None and action.const is not False:
            shown = " ".join(value) if isinstance(value, (tuple, list)) else repr(value)
            action.help = f"{action.help + '; ' if action.help else ''}default {shown}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def config_from_args(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """The config file with every given flag applied (lists become tuples, as in the config files)."""
    config = load_config(args.config)
    overrides = {}
    for name, value in vars(args).items():
        if name in TOP_LEVEL:
            overrides[TOP_LEVEL[name]] = value
        elif name in config.train:
            overrides[f"train.{name}"] = tuple(value) if isinstance(value, list) else value
    return apply_overrides(config, overrides)


def main(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    train(config, args.data, args.outdir, resume=args.resume, overwrite=args.overwrite,
          mixed_precision=args.mixed_precision)


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
