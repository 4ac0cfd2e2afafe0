"""Class image sets for prior preservation: real CelebA faces or images rendered by the base model.

    python tools/class_images.py celeba --celeba_dir DIR [--class_word boy girl] [-n 200] [--seed 0]
    python tools/class_images.py generate [--class_word boy girl] [-n 200] [--seed 0] [--config unidiffuser_v1]

Both write `<out_dir>/<class_word>/`: `images/` (the pictures), `images.txt` (one file name per line),
`caption.txt` (the caption of the same line's image) and `class_set.json` saying how the set was made.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from any folder: the repository's libs/
from typing import Any, Sequence  # noqa: E402

from libs.class_images.folder import IMAGES_DIR, ClassSetError  # noqa: E402
from libs.class_images.sources import (DEFAULT_CAPTION, DEFAULT_COUNT, DEFAULT_OUT_DIR, check_class_output,  # noqa: E402
                                       generate_class_images, import_celeba, missing_indices)
from libs.config import DEFAULT_CONFIG, apply_overrides, config_path, load_config  # noqa: E402
from libs.errors import run_cli  # noqa: E402
from libs.flags import CONFIG_FLAG, add_config_flags, key_comments, overrides, selected_config  # noqa: E402

# the config.sample keys generate takes as flags (help, type and range from the config)
SAMPLE_KEYS = {"steps": "sample.steps", "scale": "sample.scale"}


def build_parser(config: Any) -> argparse.ArgumentParser:
    """The flags; generate's sampling flags show `config`'s values as their defaults."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--class_word", nargs="+", default=["boy", "girl"], help="one set per word (default: boy girl)")
    common.add_argument("-n", "--num_images", type=int, default=DEFAULT_COUNT, help="images per class (default %(default)s)")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("-o", "--out_dir", default=DEFAULT_OUT_DIR, help="sets go to OUT_DIR/<class_word>/")
    common.add_argument("--caption", default=DEFAULT_CAPTION,
                        help="caption template, {} = class word (default %(default)r); also the prompt for generate")
    celeba = commands.add_parser("celeba", parents=[common], help="pick real faces from a CelebA download")
    celeba.add_argument("--celeba_dir", required=True, help="folder with img_align_celeba/ and list_attr_celeba.txt")
    generate = commands.add_parser("generate", parents=[common], help="render class images with the base UniDiffuser")
    generate.add_argument(CONFIG_FLAG, default=DEFAULT_CONFIG, help="config name in configs/ or a .py path")
    add_config_flags(generate, config, SAMPLE_KEYS, key_comments(config_path(DEFAULT_CONFIG)))
    generate.add_argument("--batch_size", type=int, default=4)
    generate.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser(load_config(selected_config(argv))).parse_args(argv)


def main(args: argparse.Namespace) -> None:
    if args.num_images < 1:
        raise ClassSetError(f"--num_images must be at least 1, got {args.num_images}")
    out_dir = Path(args.out_dir)
    check_class_output(out_dir, args.class_word)
    if args.command == "celeba":
        sets = {word: import_celeba(args.celeba_dir, out_dir / word, word, args.num_images, args.seed, args.caption)
                for word in args.class_word}
    else:
        config, device = _generation_setup(args)
        pipeline = None
        sets = {}
        for word in args.class_word:
            if pipeline is None and missing_indices(out_dir / word, args.num_images):
                from libs.sample.pipeline import load_pipeline

                pipeline = load_pipeline(config, device)  # once for all class words
            sets[word] = generate_class_images(config, out_dir / word, word, args.num_images, args.seed,
                                               args.caption, device, args.batch_size, pipeline)
    for word, pairs in sets.items():
        print(f"{word}: {len(pairs)} images in {out_dir / word / IMAGES_DIR}, captions like {pairs[0][1]!r}")


def _generation_setup(args: argparse.Namespace) -> tuple[Any, str]:
    import torch

    config = apply_overrides(load_config(args.config), overrides(args))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return config, device


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
