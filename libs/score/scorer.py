"""The competition metric (spec §8) and the scoring run: the `Scorer` (face backend and CLIP ViT-B/32,
loaded once) and which tasks a prompt folder and an outputs folder hold.

Per generated image, against the subject's training photos ("refs"), every metric of the table in
libs/score/metrics.py (face, clip_img, clip_text) from the image's CLIP and face embeddings; a prompt
over 77 CLIP tokens is truncated (with a warning) instead of silently scoring 0.

Files and in-memory images go through one path (`Scorer.score_images` is what `score_task` runs on the
decoded files), so the same pixels give the same numbers whether training or score.py scores them.
The result types are in libs/score/results.py, the reports in libs/score/report.py.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from ml_collections import ConfigDict
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPModel, CLIPTokenizer

from libs.files import DOWNLOAD_HINT
from libs.config import DEFAULT_CONFIG, load_config
from libs.errors import UserError
from libs.face import INSIGHTFACE_ROOT, FaceBackend, get_face_backend
from libs.models.clip import MAX_LENGTH, clip_image_preprocess
from libs.models.loading import image_encoder_source, quiet_transformers
from libs.photos import PhotoError, list_images, open_image
from libs.prompts import image_name, load_prompts
from libs.score.metrics import METRICS, ImageView
from libs.score.report import write_reports
from libs.score.results import ImageScore, PromptScore, Reference, ScoreResult, TaskResult
from libs.layout import (ADVANCED, DEFAULT_PROMPT_ROOTS, PART_LABELS, PRELIMINARY, SPLITS, SUBJECTS, Task, split_tasks,
                         tasks_with)

IMAGES_PER_PROMPT = 3


class ScoringError(UserError):
    """Bad scoring inputs (missing prompt file, output folder, reference photos); the message names them."""


class ScoringWarning(UserWarning):
    """Something scored 0, was truncated or was left out for a reason a person should know about."""


# --- the scorer ----------------------------------------------------------------------------------

@dataclass
class ReferenceSet:
    """A subject's photos as the scorer sees them, computed once per folder."""

    references: list[Reference]
    face_embeddings: list[np.ndarray]
    clip: torch.Tensor  # [N, D], L2-normalized


def _auto_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _read_generated(path: Path) -> Image.Image | str:
    """The image's pixels, or why it scores 0 ("missing", "unreadable: ...")."""
    if not path.is_file():
        return "missing"
    try:
        return open_image(path)
    except PhotoError as error:
        return f"unreadable: {error}"


class Scorer:
    """Loads the face backend and CLIP ViT-B/32 once; scores any number of tasks.

    `clip_model` is a local Hugging Face folder or hub id; by default the config's CLIP image encoder
    (`paths.clip_img`, else `paths.clip_img_hub`). Reference embeddings are cached per folder (keyed on
    the photos' names, sizes and mtimes), so `<name>_sim` and `<name>_edit` share one computation and a
    training loop can rank checkpoints without recomputing them.
    """

    def __init__(self, face_backend: str | FaceBackend = "insightface", clip_model: str | None = None,
                 device: str = "auto", config: str | ConfigDict | None = None,
                 insightface_root: str | Path = INSIGHTFACE_ROOT, progress: bool = True):
        self.face = (face_backend if isinstance(face_backend, FaceBackend)
                     else get_face_backend(face_backend, root=insightface_root))
        if clip_model is None:
            clip_model = image_encoder_source(config if isinstance(config, ConfigDict)
                                              else load_config(config or DEFAULT_CONFIG))
        self.clip_source = str(clip_model)
        self.device = torch.device(_auto_device(device))
        try:
            with quiet_transformers():
                self.clip = CLIPModel.from_pretrained(self.clip_source).eval().requires_grad_(False).to(self.device)
                self.tokenizer = CLIPTokenizer.from_pretrained(self.clip_source)
        except OSError as error:
            raise ScoringError(f"cannot load the CLIP scorer model {self.clip_source!r}: {error}\n"
                               f"  -> {DOWNLOAD_HINT}, or pass --clip_model <local folder>") from error
        self.image_size = self.clip.config.vision_config.image_size
        self.progress = progress
        self._reference_cache: dict[tuple, ReferenceSet] = {}

    # -- features --

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalized CLIP image embeddings [B, D] with OpenAI's preprocessing."""
        pixels = clip_image_preprocess(images, self.image_size).to(self.device, self.clip.dtype)
        pooled = self.clip.vision_model(pixel_values=pixels).pooler_output
        return F.normalize(self.clip.visual_projection(pooled).float(), dim=-1)

    def count_tokens(self, prompt: str) -> int:
        """CLIP tokens of a prompt, start and end tokens included (the limit is 77)."""
        with quiet_transformers():  # the tokenizer's own over-length message is replaced by ours
            return len(self.tokenizer(prompt, truncation=False).input_ids)

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalized CLIP text embeddings [B, D]; prompts over 77 tokens are truncated (the caller warns)."""
        tokens = self.tokenizer(list(prompts), truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt")
        pooled = self.clip.text_model(input_ids=tokens.input_ids.to(self.device),
                                      attention_mask=tokens.attention_mask.to(self.device)).pooler_output
        return F.normalize(self.clip.text_projection(pooled).float(), dim=-1)

    # -- references --

    def references(self, ref_dir: str | Path) -> ReferenceSet:
        """Face embeddings (first face of each photo) and CLIP embeddings of a subject's photos, cached."""
        photos = list_images(ref_dir, "reference photo")
        key = (self.face.name, str(Path(ref_dir).resolve()),
               tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in photos))
        if key in self._reference_cache:
            return self._reference_cache[key]
        references, embeddings, images = [], [], []
        for photo in photos:
            image = open_image(photo)
            embedding = self.face.embed_first(np.asarray(image))
            references.append(Reference(str(photo), embedding is not None))
            if embedding is not None:
                embeddings.append(embedding)
            images.append(image)
        if not embeddings:
            warnings.warn(f"no face detected in any reference photo in {ref_dir}: this subject's face score is 0",
                          ScoringWarning, stacklevel=2)
        clip = torch.cat([self.image_features(images[i:i + 16]) for i in range(0, len(images), 16)])
        entry = ReferenceSet(references, embeddings, clip)
        self._reference_cache[key] = entry
        return entry

    # -- scoring --

    def face_similarities(self, image: Image.Image, refs: ReferenceSet) -> tuple[bool, np.ndarray]:
        """(face found, the similarity of the image's first face to each reference face)."""
        embedding = self.face.embed_first(np.asarray(image))
        if embedding is None:
            return False, np.zeros(0)
        return True, np.asarray([float(self.face.similarity(embedding, ref)) for ref in refs.face_embeddings])

    def score_images(self, ref_dir: str | Path, prompt: str, images: Sequence[Image.Image], index: int = 0) -> PromptScore:
        """Score in-memory images for one prompt, no files involved (e.g. ranking checkpoints while training).

        The same code score.py runs on the decoded files: identical pixels give identical numbers (a JPEG
        file's pixels are not the pixels that were encoded, so compare with the decoded file)."""
        refs = self.references(ref_dir)
        return self.score_prompt(refs, index, prompt, [(f"<image {idx}>", image) for idx, image in enumerate(images)])

    def score_task(self, ref_dir: str | Path, prompts: Sequence[str] | str | Path, output_dir: str | Path,
                   task: str | None = None, images_per_prompt: int = IMAGES_PER_PROMPT) -> TaskResult:
        """Score `output_dir/{i}-{idx:03}.jpg` (idx < images_per_prompt) for every prompt i against `ref_dir`."""
        output_dir = Path(output_dir)
        task = task or output_dir.name
        if isinstance(prompts, (str, Path)):
            prompts = load_prompts(prompts)
        if not prompts:
            raise ScoringError(f"no prompts to score for {task!r}")
        if not output_dir.is_dir():
            raise ScoringError(f"generated images folder not found: {output_dir} (run sample.py for {task!r} first)")
        refs = self.references(ref_dir)
        scored = []
        bar = tqdm(total=len(prompts) * images_per_prompt, desc=f"scoring {task}", unit="img", disable=not self.progress)
        for index, prompt in enumerate(prompts):
            paths = [output_dir / image_name(index, idx) for idx in range(images_per_prompt)]
            scored.append(self.score_prompt(refs, index, prompt, [(str(p), _read_generated(p)) for p in paths]))
            if scored[-1].truncated:
                shown = prompt if len(prompt) <= 80 else prompt[:77] + "..."
                warnings.warn(f"{task} prompt {index} has {scored[-1].num_tokens} CLIP tokens (> {MAX_LENGTH}); "
                              f"its text score uses the first {MAX_LENGTH}: {shown!r}", ScoringWarning, stacklevel=2)
            bar.update(images_per_prompt)
        bar.close()
        result = TaskResult(task, str(ref_dir), str(output_dir), refs.references, scored)
        if result.missing:
            listed = ", ".join(result.missing[:6]) + (", ..." if len(result.missing) > 6 else "")
            warnings.warn(f"{task}: {len(result.missing)} generated image(s) missing or unreadable, scored 0: {listed}",
                          ScoringWarning, stacklevel=2)
        return result

    def score_run(self, run: ScoringRun) -> ScoreResult:
        """Every task of a planned run, in its order."""
        result = ScoreResult(run.split, self.face.name, self.face.comparable_with_competition)
        for spec in run.tasks:
            result.tasks[spec.name] = self.score_task(spec.photo_dir, spec.prompt_file, spec.output_dir, spec.name)
        return result

    def score_prompt(self, refs: ReferenceSet, index: int, prompt: str,
                     images: Sequence[tuple[str, Image.Image | str]], batch_size: int = 32) -> PromptScore:
        """One prompt's images, each given as (name, pixels or the reason it scores 0): the one home of the
        per-image metric (score.py's files, training's validation and best-of-N's candidates all come here).
        The CLIP image features are computed `batch_size` images at a time."""
        text = self.text_features([prompt])[0]
        found = [(idx, image.convert("RGB")) for idx, (_, image) in enumerate(images) if not isinstance(image, str)]
        features = {}
        for start in range(0, len(found), batch_size):
            chunk = found[start:start + batch_size]
            features.update(zip((idx for idx, _ in chunk), self.image_features([image for _, image in chunk])))
        pixels = dict(found)
        scored = []
        for idx, (name, image) in enumerate(images):
            if isinstance(image, str):
                scored.append(ImageScore(name, index, idx, found=False, face_found=False, error=image))
                continue
            face_found, similarities = self.face_similarities(pixels[idx], refs)
            view = ImageView(features[idx], text, refs.clip, similarities)
            scored.append(ImageScore(name, index, idx, True, face_found,
                                     {metric.name: metric.per_image(view) for metric in METRICS}))
        return PromptScore(index, prompt, self.count_tokens(prompt), scored)


# --- runs: which tasks to score ------------------------------------------------------------------

@dataclass
class ScoringRun:
    """One split to score: its prompt folder and its tasks, checked (every file and folder exists)."""

    split: str
    prompts_dir: Path
    tasks: list[Task]


def detect_split(prompts_dir: str | Path, tasks: Sequence[str]) -> str:
    """ADVANCED when the folder holds `<name>_sim.json` / `<name>_edit.json` but no `<name>.json`."""
    if not any(task.missing("prompt_file") for task in split_tasks(PRELIMINARY, tasks, prompts_dir)):
        return PRELIMINARY
    if any(not task.missing("prompt_file") for task in split_tasks(ADVANCED, tasks, prompts_dir)):
        return ADVANCED
    return PRELIMINARY


def plan_tasks(dataset: str | Path, prompts_dir: str | Path, outputs: str | Path, tasks: Sequence[str],
               split: str) -> list[Task]:
    """Every task to score, checked up front: one error lists every missing folder and file."""
    if not tasks:
        raise ScoringError("no tasks to score")
    specs = split_tasks(split, tasks, prompts_dir, outputs, dataset)
    problems = [f"{PART_LABELS['photo_dir']} not found: {photo_dir}"
                for photo_dir in dict.fromkeys(path for spec in specs for path in spec.missing("photo_dir"))]
    problems += [f"{PART_LABELS[part]} not found: {getattr(spec, part)}"
                 for spec in specs for part in ("prompt_file", "output_dir") if spec.missing(part)]
    if problems:
        raise ScoringError("cannot score:\n  " + "\n  ".join(problems))
    return specs


def plan_run(dataset: str | Path, prompts_dir: str | Path, outputs: str | Path, tasks: Sequence[str],
             advanced: bool | None = None) -> ScoringRun:
    """The run for an explicit prompt folder; `advanced=None` detects the split from its file names."""
    split = ADVANCED if advanced else (PRELIMINARY if advanced is False else detect_split(prompts_dir, tasks))
    return ScoringRun(split, Path(prompts_dir), plan_tasks(dataset, prompts_dir, outputs, tasks, split))


def _listed(paths: Sequence[str], limit: int = 6) -> str:
    return ", ".join(paths[:limit]) + (f", ... ({len(paths)} in all)" if len(paths) > limit else "")


RENDERED = ("prompt_file", "output_dir")
"""A task counts as rendered when its prompt file and its images folder exist."""


def detect_runs(dataset: str | Path, prompt_roots: Mapping[str, str | Path], outputs: str | Path,
                tasks: Sequence[str]) -> list[ScoringRun]:
    """The splits that were rendered, in SPLITS order (the graded advanced split last).

    A split counts when, for every task, its prompt file is in `prompt_roots[split]` and its images folder
    in `outputs` (`<name>.json` + `outputs/<name>/`; advanced: `<name>_sim|_edit.json` +
    `outputs/<name>_sim|_edit/`). A split only partly rendered is left out with a warning; when no split
    counts, a `ScoringError` says what was looked for where and how to render it.
    """
    outputs = Path(outputs)
    runs, partial, looked = [], [], []
    for split in (s for s in SPLITS if s in prompt_roots):
        root = Path(prompt_roots[split])
        rendered, unrendered = tasks_with(RENDERED, [split], tasks, prompts_dir=root, outputs=outputs, photos=dataset)
        missing = [str(path) for spec in unrendered for path in spec.missing("prompt_file")] if root.is_dir() \
            else [f"{root}/ (no such folder)"]
        missing += [f"{path}/" for spec in unrendered for path in spec.missing("output_dir")]
        if not missing:
            runs.append(ScoringRun(split, root, plan_tasks(dataset, root, outputs, tasks, split)))
            continue
        wanted = ([f"{root}/<name>.json", f"{outputs}/<name>/"] if split == PRELIMINARY else
                  [f"{root}/<name>_sim.json", f"{root}/<name>_edit.json", f"{outputs}/<name>_sim/",
                   f"{outputs}/<name>_edit/"])
        looked.append(f"{split} split: looked for {', '.join(wanted)}; missing {_listed(missing)}")
        if any(not spec.missing("output_dir") for spec in rendered + unrendered):
            partial.append(f"{split} split only partly rendered (missing {_listed(missing)}): not scored; "
                           f"pass --prompts {root} to score it anyway")
    if not runs:
        raise ScoringError(
            f"nothing to score: no rendered split for {', '.join(tasks)} (paths relative to {Path.cwd()})\n  "
            + "\n  ".join(looked)
            + "\n  -> render the images first (./sample.sh for the preliminary split, ./sample.sh --advanced for the "
              "advanced one), or pass --prompts <prompt folder> (and --outputs <images folder>) to score other files")
    for message in partial:
        warnings.warn(message, ScoringWarning, stacklevel=2)
    return runs


# --- whole runs ----------------------------------------------------------------------------------

def score_outputs(dataset: str | Path = "./train_data", prompts: str | Path = DEFAULT_PROMPT_ROOTS[PRELIMINARY],
                  outputs: str | Path = "./outputs", tasks: Sequence[str] = SUBJECTS,
                  advanced: bool | None = None, scorer: Scorer | None = None, report: bool = True,
                  **scorer_kwargs) -> ScoreResult:
    """Score `outputs/<task>/` for every task of one prompt folder; `advanced=None` detects the split.

    Writes score_results.json / .csv and score_report.html into `outputs` when `report` is true.
    `scorer_kwargs` build a `Scorer` when none is given.
    """
    run = plan_run(dataset, prompts, outputs, tasks, advanced)
    result = (scorer or Scorer(**scorer_kwargs)).score_run(run)
    if report:
        write_reports([result], outputs)
    return result
