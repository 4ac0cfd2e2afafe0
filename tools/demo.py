"""The whole pipeline, end to end, on the tiny world and the committed public-domain photos.

    make demo            (or: python tools/demo.py [--workdir demo_run] [--train_step 30])
    make demo-search     (or: python tools/demo.py --auto_recipe): a small recipe search instead of one recipe

Runs the same command lines a contestant runs, with `--config tiny`: build the tiny model set,
prepare a demo subject (augmented copies of the astronaut portrait) and a class set (Grace Hopper),
crop (offline face detector), train.py with validation by the metric (offline dlib face backend) and
best-step selection, sample.py, score.py. It ends with the paths of the reports to open: the run's
report.html (or the search's auto_recipe/report.html) and outputs/score_report.html. With the real
weights in models/, the real pipeline is `./train.sh && ./sample.sh && python score.py`.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from any folder: the repository's libs/
import time  # noqa: E402
from typing import Sequence  # noqa: E402

from PIL import Image, ImageEnhance, ImageOps  # noqa: E402

from libs.config import REPO_ROOT  # noqa: E402
from libs.errors import UserError, run_cli  # noqa: E402
from libs.outputs import check_output_folder, only  # noqa: E402
from libs.train_output import AUTO_DIR, REPORT_FILE  # noqa: E402

ASSETS = REPO_ROOT / "assets" / "demo"
SUBJECT = "girl_demo"
CLASS_WORD = "girl"
DEMO_FOLDERS = ("train_data", "class_data", "eval_prompts", "train_data_crop", "model_output", "outputs")
DEMO_PROMPTS = [
    "a photo of a girl",
    "a girl standing in the wild",
    "a girl wearing a red hat, oil painting",
]


def augmented_views(image: Image.Image) -> list[Image.Image]:
    """A few distinct 'photos' of one person from one portrait: mirror, zoom, light, tilt."""
    width, height = image.size
    zoom = image.crop((width // 8, height // 10, width - width // 8, height - height // 20))
    return [
        image,
        ImageOps.mirror(image),
        zoom,
        ImageEnhance.Brightness(image).enhance(1.25),
        image.rotate(6, resample=Image.BICUBIC, fillcolor=(255, 255, 255)),
    ]


def prepare_demo_data(workdir: Path) -> dict[str, Path]:
    """Write the demo subject photos, the class set and the prompt file under `workdir`."""
    photos = workdir / "train_data" / SUBJECT
    photos.mkdir(parents=True, exist_ok=True)
    for i, view in enumerate(augmented_views(Image.open(ASSETS / "astronaut.jpg").convert("RGB"))):
        view.save(photos / f"photo_{i}.jpg", quality=92)

    class_dir = workdir / "class_data" / CLASS_WORD
    (class_dir / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for i, view in enumerate(augmented_views(Image.open(ASSETS / "grace_hopper.jpg").convert("RGB"))):
        names.append(f"class_{i}.jpg")
        view.save(class_dir / "images" / names[-1], quality=92)
    (class_dir / "images.txt").write_text("\n".join(names) + "\n")
    (class_dir / "caption.txt").write_text("\n".join(f"a photo of a {CLASS_WORD}" for _ in names) + "\n")

    prompts = workdir / "eval_prompts" / f"{SUBJECT}.json"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text(json.dumps(DEMO_PROMPTS, indent=1))
    return {"photos": photos, "class_dir": class_dir, "prompts": prompts}


def run(step: str, args: Sequence[str]) -> None:
    """One pipeline step as a user would type it (the same Python, from the repository root)."""
    command = [sys.executable, *map(str, args)]
    print(f"\n=== {step}: {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO_ROOT, check=True)
    print(f"=== {step} done in {time.perf_counter() - started:.1f}s", flush=True)


# the default objective plus the CLIP image terms: on the tiny world's noise images no face is found and the
# tiny CLIP's text cosines are negative (clamped to 0), so the default's terms would all be 0 at every step
DEMO_OBJECTIVE = "sim_face + edit_face + edit_clip_text + sim_clip_img + edit_clip_img"
SEARCH_RECIPES = ("base", "half_rank", "double_lr")  # a small search: three recipes, each trained and validated


def run_demo(workdir: Path, train_step: int = 30, sample_steps: int = 6, validation_steps: int = 10,
             auto_recipe: bool = False) -> dict[str, Path]:
    """Every step of the real flow on the tiny world, validated every `validation_steps` (dlib faces, so
    the curves and the chosen step mean something); returns where the artefacts are."""
    workdir = workdir.resolve()
    check_output_folder(workdir, "demo folder (--workdir)", only(*DEMO_FOLDERS))
    from libs.score.report import REPORT_HTML  # torch, transformers: after the folder check (a refusal loads none)
    from libs.tiny_world import build_tiny_world

    print(f"tiny world: {build_tiny_world('tiny')}")
    data = prepare_demo_data(workdir)
    crops = workdir / "train_data_crop"
    model_out = workdir / "model_output" / SUBJECT
    outputs = workdir / "outputs"
    run("crop", ["tools/crop.py", "-i", workdir / "train_data", "-o", crops,
                 "--no_rembg", "--face_backend", "dlib", "--size", "256"])
    run("train", ["train.py", "--config", "tiny", "-d", crops / SUBJECT, "-o", model_out,
                  "--class_data_dir", data["class_dir"], "--num_class_images", "5", "--train_step", str(train_step),
                  "--validation_steps", str(validation_steps), "--validation_face_backend", "dlib", "--objective", DEMO_OBJECTIVE,
                  "--overwrite",
                  *(["--auto_recipe", "--auto_recipes", *SEARCH_RECIPES, "--auto_budget",
                     str(len(SEARCH_RECIPES) * train_step)] if auto_recipe else [])])
    run("sample", ["sample.py", "--config", "tiny", "--restore_path", model_out, "--prompt_path", data["prompts"],
                   "--output_path", outputs / SUBJECT, "--steps", str(sample_steps), "--skip_existing"])
    run("score", ["score.py", "--config", "tiny", "--dataset", workdir / "train_data", "--prompts",
                  workdir / "eval_prompts", "--outputs", outputs, "--tasks", SUBJECT, "--face_backend", "dlib"])
    reports = ({"search report": model_out / AUTO_DIR / REPORT_FILE} if auto_recipe
               else {"run report": model_out / REPORT_FILE})
    return {"crops": crops / SUBJECT, "personalization": model_out, "images": outputs / SUBJECT,
            "grid": outputs / SUBJECT / "grid.jpg", **reports, "report": outputs / REPORT_HTML}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / "demo_run", help="where the demo writes everything")
    parser.add_argument("--train_step", type=int, default=30)
    parser.add_argument("--sample_steps", type=int, default=6)
    parser.add_argument("--validation_steps", type=int, default=10, help="validate every N steps (and at the last)")
    parser.add_argument("--auto_recipe", action="store_true",
                        help=f"a recipe search ({', '.join(SEARCH_RECIPES)}) instead of one training run")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    try:
        artefacts = run_demo(args.workdir, args.train_step, args.sample_steps, args.validation_steps,
                             args.auto_recipe)
    except subprocess.CalledProcessError as error:
        raise UserError(f"demo stopped: step `{' '.join(map(str, error.cmd[1:3]))}` failed (exit {error.returncode})") from error
    print("\nDemo finished (tiny random models: the pictures are noise-like, the pipeline is real).")
    for name, path in artefacts.items():
        print(f"  {name:16s} {path}")
    opened = artefacts.get("run report") or artefacts["search report"]
    print(f"Open in a browser: {opened.as_uri()}\n                   {artefacts['report'].as_uri()}")
    print("With the real weights in models/ (python tools/download.py): ./train.sh && ./sample.sh && python score.py")


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
