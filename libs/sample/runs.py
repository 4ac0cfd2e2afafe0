"""sample.py's recipe: which runs exist in a competition-shaped folder (every prompt file of
libs/layout.py paired with its subject's personalization and output folder, so `./sample.sh` with no
arguments renders whatever split is there), their inputs checked, then the base models loaded once and
each personalization applied once for its runs.
"""
from __future__ import annotations

import gc
import itertools
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import ml_collections
import torch

from libs.errors import UserError
from libs.locks import claimed_folder
from libs.outputs import check_output_folder, only
from libs.personalization import check_restore_path
from libs.prompts import load_prompts
from libs.sample.files import OUTPUT_ENTRIES, sample_prompts
from libs.score.candidates import CANDIDATES_DIR, CANDIDATES_FILE
from libs.sample.pipeline import load_base, personalize
from libs.layout import ADVANCED, PRELIMINARY, PROMPT_ROOTS, SUBJECTS, tasks_with
from libs.stopping import StopSignals

if TYPE_CHECKING:
    from libs.sample.rerank import Reranker

SPLITS = ("auto", PRELIMINARY, ADVANCED)
OUTPUT_WHAT = "output folder (--output_path)"
# what sample.py writes into an output folder: the images, the grid and best-of-N's kept candidates
OURS = only(*OUTPUT_ENTRIES, CANDIDATES_DIR, CANDIDATES_FILE)


@dataclass(frozen=True)
class SampleRun:
    """One `sample.py --restore_path --prompt_path --output_path` run (restore_path None: the base model)."""

    restore_path: Path | None
    prompt_path: Path
    output_path: Path


def discover_runs(root: str | Path, split: str = "auto", subjects: Sequence[str] = SUBJECTS,
                  base_model: bool = False) -> list[SampleRun]:
    """The runs whose prompt file exists, subject by subject (one personalization serves its runs in a row).

    `split` "auto" takes every prompt file there is; "preliminary" / "advanced" take one split and require all
    of its files. Every problem is found before any model is loaded: no prompt file at all, a missing file of
    an asked-for split, or a prompt file whose subject has no `model_output/<name>` (unless `base_model`)."""
    if split not in SPLITS:
        raise UserError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    root = Path(root)
    splits = (PRELIMINARY, ADVANCED) if split == "auto" else (split,)
    present, absent = tasks_with(["prompt_file"], splits, subjects, root=root)
    if split != "auto" and absent:
        missing = [str(task.prompt_file) for task in absent]
        raise UserError(f"the {split} split needs {len(present) + len(absent)} prompt files; missing: {', '.join(missing)}")
    if not present:
        raise UserError(f"no prompt files found under {root}: looked for {PROMPT_ROOTS[PRELIMINARY]}/<name>.json and "
                        f"{PROMPT_ROOTS[ADVANCED]}/<name>_{{sim,edit}}.json for {', '.join(subjects)}")
    if base_model:
        return [SampleRun(None, task.prompt_file, task.output_dir) for task in present]
    untrained = sorted({str(task.model_dir) for task in present if task.missing("model_dir")})
    if untrained:
        raise UserError(f"prompt files exist for subjects that have no trained personalization: {', '.join(untrained)} "
                        "missing; train them first (./train.sh), or pass --base_model to sample the plain base model")
    runs = [SampleRun(task.model_dir, task.prompt_file, task.output_dir) for task in present]
    return runs


def check_runs(runs: Sequence[SampleRun]) -> None:
    """Every input of every run, checked before any model is loaded: prompt files, personalizations, outputs."""
    for run in runs:
        load_prompts(run.prompt_path)
        if run.restore_path is not None:
            check_restore_path(run.restore_path)
        check_output_folder(run.output_path, OUTPUT_WHAT, OURS)


def render_runs(config: ml_collections.ConfigDict, device: torch.device, runs: Sequence[SampleRun],
                skip_existing: bool = False, rewrite: bool = True, announce: bool = False,
                reranker: Reranker | None = None) -> None:
    """Render the runs in this process: every output folder claimed first, the base models loaded once, each
    personalization applied once for its consecutive runs; one `finetuned parameters` line per prompt file.
    With a `reranker` (best-of-N, its scoring models loaded once for all runs) each run keeps its best candidates.
    SIGTERM / SIGINT stop at once (libs.stopping): images are written whole or not at all, the locks released."""
    hint = "only complete images were kept: run the same command with --skip_existing to make the rest"
    with StopSignals(hint), ExitStack() as folders:
        for run in runs:
            folders.enter_context(claimed_folder(run.output_path, "sample.py", OUTPUT_WHAT, OURS))
        base = load_base(config, device)
        for restore_path, group in itertools.groupby(runs, key=lambda run: run.restore_path):
            pipeline = personalize(base, restore_path, count_parameters=True)
            for run in group:
                if announce:
                    print(f"== {run.prompt_path} with {restore_path or 'the base model'} -> {run.output_path}")
                print(pipeline.personalization.describe())
                print(f"finetuned parameters: {pipeline.finetuned_parameters}", flush=True)
                prompts = load_prompts(run.prompt_path)
                if reranker is None:
                    made = sample_prompts(pipeline, prompts, run.output_path, config.sample.n_samples, config.seed,
                                          skip_existing=skip_existing, rewrite=rewrite)
                else:
                    made = reranker.sample(pipeline, prompts, run.prompt_path, run.output_path,
                                           config.sample.n_samples, skip_existing=skip_existing, rewrite=rewrite)
                print(f"wrote {made} image(s) for {len(prompts)} prompt(s) to {run.output_path}")
            del pipeline  # the next personalization starts from the base alone
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
