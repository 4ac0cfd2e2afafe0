"""Prove the submission image without Docker (make image-check; needs root and mmdebstrap).

    python tools/image_check.py [--cache /var/cache/unidiffuser-image-check] [--workdir DIR]

Builds a clean Debian root (mmdebstrap, Python only: no X, no OpenGL), replays the Dockerfile's steps in it
(the CPU torch wheel standing in for the base image's CUDA torch; the root after the install steps is cached),
copies the project as `docker build` would (through .dockerignore) with a tiny trained model_output/ and the
staged models, then inside it with the network cut: imports every runtime module (naming any missing shared
library), checks with ldd that OpenCV links no X/OpenGL library, and runs the organizers' commands with only
their mounts on the tiny world. Prints the parameter sum and the score dict; exit 2 with every problem listed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from any folder: the repository's libs/

from libs.config import REPO_ROOT  # noqa: E402
from libs.errors import run_cli  # noqa: E402
from tools.image_root.check import check_image  # noqa: E402
from tools.image_root.root import CACHE_DIR  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=CACHE_DIR,
                        help="where the clean root after the install steps and the wheel cache are kept")
    parser.add_argument("--workdir", type=Path, default=CACHE_DIR / "work",
                        help="this check's build context, mounts and overlay (rewritten each run)")
    parser.add_argument("--torch", default="torch==2.13.0",
                        help="torch for the base image's place (the Makefile passes its TORCH_SPEC)")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:5.0f}s] {message}", flush=True)

    flow = check_image(REPO_ROOT, args.workdir.resolve(), args.cache, args.torch, log)
    lines = flow.parameter_lines
    print(f"finetuned parameters (the organizers' grep | awk sum): {flow.printed_sum} = sum of {len(lines)} lines {lines}")
    print(f"score: {flow.score_dict}")
    log("the submission image works in its bare base, offline")


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
