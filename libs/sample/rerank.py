"""Best-of-N sampling: render `candidates` × `n_samples` images per prompt and keep the `n_samples` that the
competition's own metric ranks highest (`sample.py --candidates N`).

Candidate k of a prompt (k = slot i + round c · n_samples) draws its noise from keyed_generator(seed, prompt
index, k): round 0 is exactly what `--candidates 1` renders, and a candidate never depends on the batch size
or on the other prompts. Every candidate is encoded as the JPEG that would be written and scored on the
pixels that JPEG decodes to, through libs/score/scorer.py's `Scorer.score_prompt` (score.py's own per-image metric:
the face backend, CLIP ViT-B/32, the same preprocessing and max(0, ·) clamps), so a kept file scores in
score.py what it scored here. The per-image objective is the judged numbers of the run's split, weighted by
`rerank_weights` (face, clip_img, clip_text): `*_sim` face + clip_img; `*_edit` and preliminary
`<name>.json` face + clip_img + clip_text. The kept images are written best first as
`{prompt}-000.jpg` ... (the n_samples best, ties to the lower k).

The references are the competition's: `train_data/<name>/` under `--all`; a single run takes
`reference_dir`, by default the photo folder train.py recorded. They, the face model and a face in some
reference are checked before any image is rendered; reference embeddings are computed once per folder and
process (the Scorer's cache). With `candidates` 1 none of this runs.
"""
from __future__ import annotations

import io
import json
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import ml_collections
import torch
from PIL import Image

from libs.config import KEY_CHOICES
from libs.errors import UserError
from libs.face import (INSIGHTFACE_MODEL, FaceBackend, FaceModelFailed, FaceModelMissing, default_insightface_root,
                       get_face_backend)
from libs.layout import ADVANCED_SPLITS, TRAIN_DATA
from libs.outputs import check_output_folder
from libs.photos import list_images
from libs.prompts import image_name
from libs.sample.files import (encode_jpeg, missing_samples, peak_memory, prompt_texts, render_jobs, write_grid,
                               write_image_bytes)
from libs.sample.pipeline import T2IPipeline
from libs.score.candidates import (CANDIDATES_DIR, CANDIDATES_FILE, Candidate, CandidateRecord, CandidatesFileError,
                                   load_record)
from libs.score.metrics import METRIC_NAMES, METRICS as METRIC_TABLE
from libs.score.results import ImageScore
from libs.score.scorer import ReferenceSet, Scorer, ScoringWarning
from libs.train_output import RUN_FILE

METRICS = METRIC_NAMES
"""The per-image numbers of spec §8 (libs/score/metrics.py's table), in the order of `rerank_weights`."""
FACE_BACKENDS = KEY_CHOICES["sample.rerank_face_backend"]
_CANDIDATE_FILE = re.compile(r"^(\d+)-(\d{3,})\.jpg$")


class RerankError(UserError):
    """Best-of-N cannot rank: no reference photos, no face in them, no face model, bad weights."""


def judged_metrics(prompt_path: str | Path) -> tuple[str, ...]:
    """What the competition judges for a prompt file, from the metric table: an advanced `<name>_<split>.json` the
    metrics its split reports (`*_sim` face and clip_img, `*_edit` all three), the preliminary `<name>.json` those
    of the printed preliminary dict (all three)."""
    stem = Path(prompt_path).stem
    split = next((part for part in ADVANCED_SPLITS if stem.endswith(f"_{part}")), None)
    return tuple(metric.name for metric in METRIC_TABLE
                 if (split in metric.advanced_splits if split else metric.preliminary_key is not None))


@dataclass(frozen=True)
class RerankObjective:
    """A weighted sum of an image's judged numbers; higher is better."""

    weights: tuple[tuple[str, float], ...]

    @classmethod
    def for_prompts(cls, prompt_path: str | Path, weights: Sequence[float]) -> RerankObjective:
        by_metric = dict(zip(METRICS, weights, strict=True))
        return cls(tuple((metric, float(by_metric[metric])) for metric in judged_metrics(prompt_path)))

    def __call__(self, score: ImageScore) -> float:
        return float(sum(weight * getattr(score, metric) for metric, weight in self.weights))

    def __str__(self) -> str:
        return " + ".join(metric if weight == 1 else f"{weight:g}*{metric}" for metric, weight in self.weights)


def subject_of(prompt_path: str | Path) -> str:
    """`boy1` for eval_prompts/boy1.json and eval_prompts_advance/boy1_sim.json / boy1_edit.json."""
    stem = Path(prompt_path).stem
    for split in ADVANCED_SPLITS:
        if stem.endswith(f"_{split}"):
            return stem[:-len(split) - 1]
    return stem


def recorded_photo_folder(restore_path: Path | None) -> Path | None:
    """The `-d` folder train.py recorded in `<restore_path>/train_config.json`, None when there is no record."""
    if restore_path is None or not (restore_path / RUN_FILE).is_file():
        return None
    try:
        data_dir = json.loads((restore_path / RUN_FILE).read_text(encoding="utf-8")).get("data_dir")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
        raise RerankError(f"{restore_path / RUN_FILE} is not readable ({error}): pass --reference_dir "
                          "<the subject's photo folder>") from error
    return Path(data_dir) if isinstance(data_dir, str) and data_dir else None


def reference_dirs(runs: Sequence, reference_dir: str, all_runs: bool) -> dict[Path, Path]:
    """Output folder -> the reference photo folder its candidates are ranked against."""
    if all_runs:
        if reference_dir:
            raise RerankError(f"reference_dir {reference_dir} is for a single run: under --all each subject's "
                              f"references are {TRAIN_DATA}/<name>/ (what the organizers score against)")
        return {run.output_path: Path.cwd() / TRAIN_DATA / subject_of(run.prompt_path) for run in runs}
    folders = {}
    for run in runs:
        folder = Path(reference_dir) if reference_dir else recorded_photo_folder(run.restore_path)
        if folder is None:
            raise RerankError("best-of-N ranks candidates against the subject's photos: pass --reference_dir "
                              f"<photo folder> (no train.py record in {run.restore_path} names one)")
        if not reference_dir and not folder.is_dir():
            raise RerankError(f"the photo folder train.py recorded in {run.restore_path / RUN_FILE}, {folder}, is "
                              "not there any more: pass --reference_dir <the subject's photo folder>")
        folders[run.output_path] = folder
    return folders


def rerank_face_backend(name: str) -> FaceBackend:
    """The face model of the ranking: insightface buffalo_l (the competition's) or dlib, chosen explicitly."""
    if name not in FACE_BACKENDS:
        raise RerankError(f"rerank_face_backend {name!r} is not one of {', '.join(FACE_BACKENDS)}")
    if name == "dlib":
        print(f"best-of-N face model: dlib (the explicit offline choice; NOT the competition's insightface "
              f"{INSIGHTFACE_MODEL}: its face numbers rank differently)")
        return get_face_backend("dlib")
    try:
        return get_face_backend(name, root=default_insightface_root())
    except FaceModelMissing as error:
        raise RerankError(f"best-of-N needs the competition's face model, insightface {INSIGHTFACE_MODEL}: "
                          f"{str(error).splitlines()[0]}; install it, or pass --rerank_face_backend dlib to rank "
                          "with dlib (offline, not the competition's model)") from error


class Reranker:
    """The scorer (models loaded once per process), the settings and every run's references, all checked."""

    def __init__(self, config: ml_collections.ConfigDict, scorer: Scorer, ref_dirs: dict[Path, Path]):
        sample = config.sample
        self.candidates = int(sample.candidates)
        self.weights = tuple(float(w) for w in sample.rerank_weights)
        self.keep_candidates = bool(sample.keep_candidates)
        self.seed = int(config.seed)
        self.scorer = scorer
        self.ref_dirs = ref_dirs

    def references(self, output_path: Path) -> ReferenceSet:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ScoringWarning)  # no face at all is an error, checked in build_reranker
            return self.scorer.references(self.ref_dirs[output_path])

    def sample(self, pipeline: T2IPipeline, prompts: Sequence[str], prompt_path: Path, output_path: Path,
               n_samples: int, skip_existing: bool = False, rewrite: bool = True) -> int:
        """Render, score and keep the best `n_samples` per prompt; returns the number of kept images written.

        With `skip_existing` a prompt whose kept images are all complete (and, with keep_candidates, recorded)
        is skipped; any other prompt is redone whole, so its images stay the best of its full candidate set."""
        total = n_samples * self.candidates
        objective = RerankObjective.for_prompts(prompt_path, self.weights)
        refs = self.references(output_path)
        record = self._record(output_path, n_samples, objective, skip_existing)
        partial = {index for index, _ in missing_samples(len(prompts), output_path, n_samples, skip_existing,
                                                         pipeline.config.resolution)}
        unrecorded = {i for i in range(len(prompts)) if self.keep_candidates and not record.of_prompt(i)}
        redo = sorted(partial | unrecorded)
        if not self.keep_candidates:
            self._forget(output_path, redo)
        if len(redo) < len(prompts):
            print(f"skipping {len(prompts) - len(redo)} prompt(s) whose {n_samples} images already exist")
        if not redo:
            print("nothing to sample")
            return 0
        print(f"best-of-{self.candidates}: {total} candidates per prompt, ranked by {objective} against "
              f"{self.ref_dirs[output_path]} ({self.scorer.face.name} face model)")
        texts = prompt_texts(pipeline, prompts, redo, rewrite)
        jobs = [(index, k) for index in redo for k in range(total)]
        started, score_seconds = time.perf_counter(), 0.0
        made, kept_values, first_values = 0, [], []
        pending: dict[int, list[bytes]] = {}
        for (index, k), image in render_jobs(pipeline, texts, jobs, self.seed):
            pending.setdefault(index, []).append(encode_jpeg(image))
            if k < total - 1:
                continue
            files = pending.pop(index)
            scoring = time.perf_counter()
            try:
                scores = self.score_candidates(refs, index, prompts[index], files)
            except FaceModelFailed as error:
                raise RerankError(f"{error}. The {made} image(s) of the prompts ranked before are whole in "
                                  f"{output_path}; after the fix run the same command with --skip_existing to "
                                  "make the rest") from error
            score_seconds += time.perf_counter() - scoring
            values = [objective(score) for score in scores]
            kept = choose(values, n_samples)
            if self.keep_candidates:
                self._write_candidates(output_path, index, files)
            for slot, k in enumerate(kept):
                write_image_bytes(files[k], output_path / image_name(index, slot), made, len(redo) * n_samples)
                made += 1
            kept_values += [values[k] for k in kept]
            first_values += values[:n_samples]
            if self.keep_candidates:
                names = {k: image_name(index, slot) for slot, k in enumerate(kept)}
                record.replace_prompt(index, [
                    Candidate(index, k, (self.seed, index, k), s.face_found, s.face, s.clip_img, s.clip_text,
                              values[k], names.get(k)) for k, s in enumerate(scores)])
                record.save(output_path)
        seconds = time.perf_counter() - started
        write_grid(output_path, len(prompts), n_samples)
        kept_mean, first_mean = sum(kept_values) / len(kept_values), sum(first_values) / len(first_values)
        print(f"best-of-{self.candidates} ({objective}, {self.scorer.face.name} faces): mean objective of the kept "
              f"images {kept_mean:.4f}, of the first {n_samples} candidates (what --candidates 1 keeps) "
              f"{first_mean:.4f}, gain {kept_mean - first_mean:+.4f} over {len(redo)} prompt(s)")
        print(f"{made} image(s) kept of {len(jobs)} rendered in {seconds:.1f}s ({score_seconds:.1f}s scoring); "
              f"peak memory: {peak_memory()}")
        return made

    def score_candidates(self, refs: ReferenceSet, index: int, prompt: str, files: Sequence[bytes]) -> list[ImageScore]:
        """A prompt's candidates scored on the pixels their JPEG files decode to, as score.py would score the files."""
        return self.scorer.score_prompt(refs, index, prompt, [
            (f"{CANDIDATES_DIR}/{image_name(index, k)}", Image.open(io.BytesIO(data)).convert("RGB"))
            for k, data in enumerate(files)]).images

    def _record(self, output_path: Path, n_samples: int, objective: RerankObjective,
                skip_existing: bool) -> CandidateRecord:
        """The record to extend: a resumed run keeps the entries of a readable record made with the same settings."""
        settings = {"candidates": self.candidates, "n_samples": n_samples, "seed": self.seed,
                    "objective": str(objective), "face_backend": self.scorer.face.name,
                    "reference_dir": str(self.ref_dirs[output_path])}
        fresh = CandidateRecord(settings, [])
        if not (self.keep_candidates and skip_existing):
            return fresh
        try:
            old = load_record(output_path)
        except CandidatesFileError as error:
            print(f"note: {error}; its prompts are rendered again")
            return fresh
        return old if old is not None and old.settings == settings else fresh

    def _forget(self, output_path: Path, indices: Sequence[int]) -> None:
        """A run without keep_candidates redoes `indices`: a former run's record of them no longer fits its images."""
        try:
            record = load_record(output_path)
        except CandidatesFileError:
            return  # the report says it cannot show it
        if record is None or not any(record.of_prompt(index) for index in indices):
            return
        for index in indices:
            record.replace_prompt(index, [])
            self._remove_candidate_files(output_path, index, keep=0)
        record.save(output_path)
        print(f"{CANDIDATES_FILE}: the former candidates of the {len(indices)} prompt(s) made again are removed")

    def _remove_candidate_files(self, output_path: Path, index: int, keep: int) -> None:
        """candidates/{index}-{k}.jpg for k >= keep (a former run's with a larger N, or all of them)."""
        folder = output_path / CANDIDATES_DIR
        if folder.is_dir():
            for path in folder.iterdir():
                match = _CANDIDATE_FILE.match(path.name)
                if match and int(match[1]) == index and int(match[2]) >= keep:
                    path.unlink()

    def _write_candidates(self, output_path: Path, index: int, files: list[bytes]) -> None:
        folder = output_path / CANDIDATES_DIR
        self._remove_candidate_files(output_path, index, keep=len(files))
        for k, data in enumerate(files):
            write_image_bytes(data, folder / image_name(index, k), k, len(files))


def choose(values: Sequence[float], n_samples: int) -> list[int]:
    """The candidates kept: the `n_samples` highest objectives, best first, ties to the lower candidate index."""
    return sorted(range(len(values)), key=lambda k: (-values[k], k))[:n_samples]


def build_reranker(config: ml_collections.ConfigDict, runs: Sequence, device: torch.device,
                   all_runs: bool) -> Reranker | None:
    """None with `candidates` 1 (nothing about references is read). Otherwise every run's reference folder
    and photos, the face model and a face in some reference of each folder, checked before anything is
    rendered or written; the scoring models are loaded here, once."""
    sample = config.sample
    if int(sample.candidates) == 1:
        if sample.keep_candidates:
            raise RerankError("keep_candidates writes the candidates of best-of-N: give --candidates N > 1 too")
        return None
    if len(sample.rerank_weights) != len(METRICS) or not any(sample.rerank_weights):
        raise RerankError(f"rerank_weights takes {len(METRICS)} non-negative weights ({', '.join(METRICS)}), "
                          f"not all 0; got {' '.join(map(str, sample.rerank_weights))}")
    ref_dirs = reference_dirs(runs, sample.reference_dir, all_runs)
    if sample.keep_candidates:
        for output_path in ref_dirs:
            check_output_folder(output_path / CANDIDATES_DIR, "--keep_candidates folder")
            if (output_path / CANDIDATES_FILE).is_dir():
                raise RerankError(f"{output_path / CANDIDATES_FILE} is a folder, where --keep_candidates writes its "
                                  "record of the candidates: move it away")
    for folder in dict.fromkeys(ref_dirs.values()):
        list_images(folder, "reference photo")
    scorer = Scorer(rerank_face_backend(sample.rerank_face_backend), config=config, device=str(device),
                    progress=False)
    reranker = Reranker(config, scorer, ref_dirs)
    for output_path, folder in ref_dirs.items():
        if not any(ref.face_found for ref in reranker.references(output_path).references):
            raise RerankError(f"no face found by {scorer.face.name} in any reference photo in {folder}: best-of-N "
                              "cannot rank identity; use photos that show the subject's face")
    return reranker
