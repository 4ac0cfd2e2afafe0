"""Package the submission image the organizers grade: code + model_output/ + the models they do not mount.

    python tools/make_submission.py [--name myteam] [--insightface_root ~/.insightface]   (or: make submission)
    python tools/make_submission.py --dry-run          # check every input and print the plan; builds nothing
    python tools/make_submission.py --candidates 4     # the image's ./sample.sh keeps the best 3 of 12 per prompt

Checks that model_output/<name> holds a finished personalization for boy1 boy2 girl1 girl2 and that local
copies of CLIP ViT-L/14, CLIP ViT-B/32 and insightface buffalo_l exist; stages those models into
build/submission/models; `docker build`; saves `<name>_submit.tar.gz`; prints the `docker run` line that
tries it with the organizers' mounts and no network.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from any folder: the repository's libs/

from libs.config import DEFAULT_CONFIG, load_config  # noqa: E402
from libs.errors import run_cli  # noqa: E402
from libs.face import INSIGHTFACE_ROOT  # noqa: E402
from libs.submission import build_and_save, plan_submission, stage_models  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="unidiffuser_face", help="team name: the archive is <name>_submit.tar.gz")
    parser.add_argument("--tag", default=None, help="image tag (default: <name>:submit)")
    parser.add_argument("--insightface_root", default=INSIGHTFACE_ROOT, help="folder holding models/buffalo_l/*.onnx")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="config whose paths name the local CLIP folders")
    parser.add_argument("--candidates", type=int, default=1,
                        help="best-of-N baked into the image: its no-argument ./sample.sh runs sample.py --all "
                             "--candidates N (README 'Submitting'); 1 = plain sampling (default: %(default)s)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                      help="check the inputs and print the plan; copy and build nothing")
    mode.add_argument("--stage-only", "--stage_only", dest="stage_only", action="store_true",
                      help="stage the models into build/submission/models, but do not run docker")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    plan = plan_submission(load_config(args.config), args.name, args.insightface_root, tag=args.tag,
                           candidates=args.candidates)
    print(plan.describe())
    if args.dry_run:
        print("dry run: nothing copied or built")
        return
    stage_models(plan)
    print(f"staged {len(plan.models)} model folder(s) into build/submission/models")
    if args.stage_only:
        return
    archive = build_and_save(plan)
    print(f"wrote {archive} ({archive.stat().st_size / 2**30:.1f} GiB)\ntry it exactly as the organizers run it:\n"
          f"  {plan.run_line()}")


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
