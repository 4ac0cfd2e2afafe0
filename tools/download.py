"""Fetch the official weights into models/ (skipping what is already there).

    python tools/download.py [--config unidiffuser_v1] [--only nnet autoencoder ...]

Every entry script checks for its weights at start (libs.download.ensure_weights), so a missing file is
reported by name with this command, not as a stack trace deep inside a loader.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from any folder: the repository's libs/

from libs.config import DEFAULT_CONFIG, load_config  # noqa: E402
from libs.download import WEIGHT_KEYS, download_weights  # noqa: E402
from libs.errors import UserError, run_cli  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="config name in configs/ or a .py path")
    parser.add_argument("--only", nargs="+", choices=WEIGHT_KEYS, help="fetch only these items")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    try:
        download_weights(config, args.only)
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - network/auth errors become one readable line
        raise UserError(f"download failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}\n"
                        "  -> check the network / Hugging Face access, or copy the files into models/ by hand") from error


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
