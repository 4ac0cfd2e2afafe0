"""What best-of-N sampling (`sample.py --candidates N`) costs and what it gains: N = 2, 4, 8 against N = 1,
measured in the same run, with denoising, decoding and scoring timed apart.

    python -m bench.bench_rerank --size tiny --threads 1 --repeats 3          # CPU
    python -m bench.bench_rerank --size small --face_backend insightface      # GPU (buffalo_l installed)

Each configuration renders `--prompts` edit prompts x 3 kept images x N candidates through the pieces sample.py
runs (libs.sample.files.render_jobs' batching, T2IPipeline.denoise / decode, the Reranker's
`score_candidates`: JPEG encode + decode, the face backend and the scorer's batched CLIP, then `choose`):
  denoise_s / decode_s / score_s   seconds of each part (medians over the repeats)
  factor_*                         the same against N = 1 (the run without best-of-N costs N = 1's
                                   denoise + decode; N = 1's score_s is what scoring the 3 kept would cost)
  kept_objective / first_objective mean objective (face + clip_img + clip_text, the edit split's) of the kept
                                   images and of the first 3 candidates (what N = 1 keeps); gain = the difference
Weights are random (bench.common.random_checkpoints, a random personalization); the reference photo is a
public-domain portrait (skimage's astronaut) so the face model finds a face in it. On random models the
objective gain shows that the mechanics choose better-scoring images, not what real weights gain.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path
from typing import Any, Callable

from PIL import Image
from skimage import data

from bench.common import (Stopwatch, bench_config, common_parser, fmt_float, fmt_str, interleaved_runs, median,
                          print_table, random_checkpoints, size_summary, start, timing_fields, write_personalization,
                          write_result, write_scorer_clip)
from libs.diffusion import keyed_generator
from libs.face import default_insightface_root, insightface_models_present
from libs.sample.files import encode_jpeg
from libs.sample.pipeline import load_pipeline
from libs.sample.rerank import FACE_BACKENDS, Reranker, RerankObjective, choose, rerank_face_backend
from libs.score.scorer import Scorer

BENCH = "bench_rerank"
CANDIDATES = (1, 2, 4, 8)
PROMPTS = ("a boy standing on a beach at sunset", "a boy wearing a red hoodie in a cafe",
           "a boy riding a bicycle in the city", "an oil painting of a boy")


def render_and_rank(reranker: Reranker, pipeline, refs, n_candidates: int, n_prompts: int,
                    n_samples: int) -> Callable[[], dict[str, Any]]:
    """One configuration: every prompt's n_samples x N candidates denoised in sample.py's batches, decoded,
    scored and chosen; returns the laps and the objectives."""
    objective = RerankObjective.for_prompts("bench_edit.json", reranker.weights)
    prompts = list(PROMPTS[:n_prompts])
    total = n_samples * n_candidates
    jobs = [(index, k) for index in range(n_prompts) for k in range(total)]
    batch_size = pipeline.config.sample.batch_size

    def run() -> dict[str, Any]:
        watch = Stopwatch(pipeline.device)
        files: dict[int, list[bytes]] = {index: [] for index in range(n_prompts)}
        for start_at in range(0, len(jobs), batch_size):
            batch = jobs[start_at:start_at + batch_size]
            z = pipeline.denoise([prompts[index] for index, _ in batch],
                                 [keyed_generator(reranker.seed, index, k) for index, k in batch])
            watch.lap("denoise")
            for (index, _), image in zip(batch, pipeline.decode(z)):
                files[index].append(encode_jpeg(image))
            watch.lap("decode")
        kept, first = [], []
        for index in range(n_prompts):
            values = [objective(s) for s in reranker.score_candidates(refs, index, prompts[index], files[index])]
            kept += [values[k] for k in choose(values, n_samples)]
            first += values[:n_samples]
        watch.lap("score")
        return {"laps": dict(watch.laps), "kept": sum(kept) / len(kept), "first": sum(first) / len(first)}

    return run


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = start(args)
    config = bench_config(args.size)
    config.sample.steps = args.steps or config.sample.steps
    config.sample.update(rerank_face_backend=args.face_backend)
    n_samples = int(config.sample.n_samples)
    with random_checkpoints(config) as config, tempfile.TemporaryDirectory(prefix="bench_rerank_") as tmp:
        restore = write_personalization(config, Path(tmp) / "personalization")
        photos = Path(tmp) / "train_data" / "boy1"
        photos.mkdir(parents=True)
        Image.fromarray(data.astronaut()).save(photos / "astronaut.jpg", quality=95)
        scorer_config = copy.deepcopy(config)
        scorer_config.paths.clip_img = str(write_scorer_clip(Path(tmp) / "scorer_clip", config.bench_clip))
        scorer = Scorer(rerank_face_backend(args.face_backend), config=scorer_config, device=str(device),
                        progress=False)
        reranker = Reranker(config, scorer, {Path(tmp): photos})
        refs = reranker.references(Path(tmp))
        pipeline = load_pipeline(config, device, restore)
        runs = {f"candidates_{n}": render_and_rank(reranker, pipeline, refs, n, args.prompts, n_samples)
                for n in args.candidates}
        measured = interleaved_runs(runs, device, args.repeats, args.warmup)
    parts = ("denoise", "decode", "score")

    def part_median(name: str, part: str) -> float:
        return median([out["laps"][part] for out in measured[name].outputs])

    base = f"candidates_{args.candidates[0]}"
    sizes = {**size_summary(config), "steps": int(config.sample.steps), "n_samples": n_samples,
             "prompts": args.prompts, "batch_size": int(config.sample.batch_size)}
    rows = []
    for n in args.candidates:
        name = f"candidates_{n}"
        outputs = measured[name].outputs
        record = {"config": name, "size": args.size, "sizes": sizes, "candidates": n, "face_backend": scorer.face.name,
                  **timing_fields(measured[name], args.repeats, args.warmup),
                  "speedup_vs_baseline": median(measured[base].times) / median(measured[name].times),
                  **{f"{part}_s": part_median(name, part) for part in parts},
                  **{f"factor_{part}": part_median(name, part) / part_median(base, part) for part in parts},
                  "kept_objective": median([out["kept"] for out in outputs]),
                  "first_objective": median([out["first"] for out in outputs])}
        record["gain"] = record["kept_objective"] - record["first_objective"]
        record["factor_total"] = median(measured[name].times) / median(measured[base].times)
        rows.append(write_result(args.results_dir, BENCH, record, device))
    print(f"best-of-N on {rows[0]['device_name']} ({args.size}, {sizes['steps']} steps, {args.prompts} prompt(s) x "
          f"{n_samples} kept, {scorer.face.name} faces); factors against {base}:")
    print_table(rows, [("config", "config", fmt_str), ("total s", "median_s", fmt_float(3)),
                       ("denoise s", "denoise_s", fmt_float(3)), ("decode s", "decode_s", fmt_float(3)),
                       ("score s", "score_s", fmt_float(3)), ("x total", "factor_total", fmt_float(2)),
                       ("x denoise", "factor_denoise", fmt_float(2)), ("x decode", "factor_decode", fmt_float(2)),
                       ("x score", "factor_score", fmt_float(2)), ("kept obj", "kept_objective", fmt_float(4)),
                       ("first obj", "first_objective", fmt_float(4)), ("gain", "gain", fmt_float(4))])
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common_parser(__doc__)
    parser.add_argument("--candidates", type=int, nargs="+", default=list(CANDIDATES),
                        help="N values; the first is the baseline of the factors (default: %(default)s)")
    parser.add_argument("--prompts", type=int, default=2, choices=range(1, len(PROMPTS) + 1),
                        help="edit prompts rendered per configuration (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None, help="solver steps (default: the config's)")
    default_face = "insightface" if insightface_models_present(default_insightface_root()) else "dlib"
    parser.add_argument("--face_backend", choices=FACE_BACKENDS, default=default_face,
                        help="face model of the ranking (default: insightface when buffalo_l is installed, else dlib)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
