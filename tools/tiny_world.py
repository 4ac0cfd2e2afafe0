"""Write the tiny model world: the real architectures at toy sizes, random weights, real file formats.

    python tools/tiny_world.py [--config tiny] [--out tiny_world/models] [--force]

Files: `uvit_v1.pth` (plain state_dict), `autoencoder_kl.pth` (LDM layout), `caption_decoder.pth`
(`module.` prefix, a tiny GPT-2 with the legacy attention buffers), and Hugging Face folders
`clip-vit-large-patch14/` and `clip-vit-base-patch32/` (full CLIPModel + the real CLIP BPE vocabulary).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from any folder: the repository's libs/

from libs.errors import run_cli  # noqa: E402
from libs.tiny_world import build_tiny_world  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--out", default=None, help="folder (default: the config's model folder)")
    parser.add_argument("--force", action="store_true", help="rewrite even when up to date")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    print(f"tiny world ready in {build_tiny_world(args.config, args.out, args.force)}")


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
