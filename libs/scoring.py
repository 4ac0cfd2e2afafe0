"""The competition metric (spec §8), callable from Python and from score.py.

Per generated image, against the subject's training photos ("refs"):

* face      = max(0, max over refs-with-a-face of face similarity), 0 when the image has no face;
* clip_img  = max(0, max over all refs of the CLIP ViT-B/32 image cosine);
* clip_text = max(0, cosine between the image and its prompt), the prompt truncated to 77 tokens
  (with a warning) instead of silently scoring 0.

A missing or unreadable image scores 0 on all three. Means are taken in the competition's order:
the 3 images of a prompt -> prompt, prompts -> task, tasks -> overall (every task weighs the same).
"""
from __future__ import annotations

import csv
import html
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence
from urllib.parse import quote

import numpy as np
import torch
import torch.nn.functional as F
from ml_collections import ConfigDict
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPModel, CLIPTokenizer

from libs.checkpoint import DOWNLOAD_HINT, atomic_path, save_json
from libs.config import DEFAULT_CONFIG, load_config
from libs.errors import UserError
from libs.face import INSIGHTFACE_ROOT, FaceBackend, get_face_backend
from libs.models.clip import MAX_LENGTH, clip_image_preprocess
from libs.models.loading import quiet_transformers, resolve_pretrained
from libs.photos import IMAGE_EXTENSIONS, PhotoError, is_image_file, open_image
from libs.prompts import image_name, load_prompts
from libs.subjects import ADVANCED_SPLITS, SUBJECTS

DEFAULT_TASKS = SUBJECTS
IMAGES_PER_PROMPT = 3
RESULTS_JSON = "score_results.json"
RESULTS_CSV = "score_results.csv"
REPORT_HTML = "score_report.html"


class ScoringError(UserError):
    """Bad scoring inputs (missing prompt file, output folder, reference photos); the message names them."""


class ScoringWarning(UserWarning):
    """Something scored 0 or was truncated for a reason a person should know about."""


# --- inputs --------------------------------------------------------------------------------------

def reference_photos(ref_dir: str | Path) -> list[Path]:
    """The subject's photos: *.jpg, *.jpeg, *.png (any case), hidden files skipped, sorted by name."""
    ref_dir = Path(ref_dir)
    if not ref_dir.is_dir():
        raise ScoringError(f"reference photo folder not found: {ref_dir}")
    photos = sorted(p for p in ref_dir.iterdir() if is_image_file(p))
    if not photos:
        raise ScoringError(f"no reference photos ({', '.join(IMAGE_EXTENSIONS)}) in {ref_dir}")
    return photos


def generated_image_path(output_dir: str | Path, prompt_index: int, idx: int) -> Path:
    """`outputs/<task>/{prompt_index}-{idx:03}.jpg`, as sample.py writes it."""
    return Path(output_dir) / image_name(prompt_index, idx)


# --- results -------------------------------------------------------------------------------------

def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else 0.0


@dataclass
class ImageScore:
    path: str
    prompt_index: int
    idx: int
    found: bool  # the file exists and could be read
    face_found: bool
    face: float = 0.0
    clip_img: float = 0.0
    clip_text: float = 0.0
    error: str | None = None  # why a missing/unreadable image scored 0


@dataclass
class PromptScore:
    index: int
    prompt: str
    num_tokens: int  # CLIP tokens including start/end; > 77 means the prompt was truncated
    images: list[ImageScore]

    @property
    def truncated(self) -> bool:
        return self.num_tokens > MAX_LENGTH

    @property
    def face(self) -> float:
        return _mean(image.face for image in self.images)

    @property
    def clip_img(self) -> float:
        return _mean(image.clip_img for image in self.images)

    @property
    def clip_text(self) -> float:
        return _mean(image.clip_text for image in self.images)


@dataclass
class Reference:
    path: str
    face_found: bool


@dataclass
class TaskResult:
    task: str
    ref_dir: str
    output_dir: str
    references: list[Reference]
    prompts: list[PromptScore]

    @property
    def face(self) -> float:
        return _mean(prompt.face for prompt in self.prompts)

    @property
    def clip_img(self) -> float:
        return _mean(prompt.clip_img for prompt in self.prompts)

    @property
    def clip_text(self) -> float:
        return _mean(prompt.clip_text for prompt in self.prompts)

    @property
    def images(self) -> list[ImageScore]:
        return [image for prompt in self.prompts for image in prompt.images]

    @property
    def missing(self) -> list[str]:
        return [image.path for image in self.images if not image.found]

    @property
    def face_detection_rate(self) -> float:
        """Share of the generated images that exist in which a face was found."""
        present = [image for image in self.images if image.found]
        return _mean(1.0 if image.face_found else 0.0 for image in present)

    @property
    def reference_faces(self) -> int:
        return sum(ref.face_found for ref in self.references)

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "face": self.face,
            "clip_img": self.clip_img,
            "clip_text": self.clip_text,
            "face_detection_rate": self.face_detection_rate,
            "reference_faces": self.reference_faces,
            "missing": self.missing,
            "ref_dir": self.ref_dir,
            "output_dir": self.output_dir,
            "references": [vars(ref) for ref in self.references],
            "prompts": [
                {"index": p.index, "prompt": p.prompt, "num_tokens": p.num_tokens, "truncated": p.truncated,
                 "face": p.face, "clip_img": p.clip_img, "clip_text": p.clip_text,
                 "images": [vars(image) for image in p.images]}
                for p in self.prompts
            ],
        }


@dataclass
class ScoreResult:
    """Every task's result plus the competition's summary numbers."""

    split: str  # "preliminary" or "advanced"
    face_backend: str
    comparable_with_competition: bool
    tasks: dict[str, TaskResult] = field(default_factory=dict)

    @property
    def preliminary(self) -> dict[str, float]:
        """`{face, img_clip, text_clip}`: means over tasks of the task means."""
        tasks = list(self.tasks.values())
        return {"face": _mean(t.face for t in tasks), "img_clip": _mean(t.clip_img for t in tasks),
                "text_clip": _mean(t.clip_text for t in tasks)}

    @property
    def advanced(self) -> dict[str, float] | None:
        """The five advanced numbers, each a mean over the subjects' `<name>_sim` / `<name>_edit` tasks."""
        if self.split != "advanced":
            return None
        sim = [t for name, t in self.tasks.items() if name.endswith("_sim")]
        edit = [t for name, t in self.tasks.items() if name.endswith("_edit")]
        return {"sim_face": _mean(t.face for t in sim), "sim_clip_img": _mean(t.clip_img for t in sim),
                "edit_face": _mean(t.face for t in edit), "edit_clip_img": _mean(t.clip_img for t in edit),
                "edit_clip_text": _mean(t.clip_text for t in edit)}

    @property
    def summary(self) -> dict[str, float]:
        return self.advanced if self.split == "advanced" else self.preliminary

    def to_dict(self) -> dict:
        return {"split": self.split, "summary": self.summary, "face_backend": self.face_backend,
                "comparable_with_competition": self.comparable_with_competition,
                "tasks": {name: task.to_dict() for name, task in self.tasks.items()}}


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


class Scorer:
    """Loads the face backend and CLIP ViT-B/32 once; scores any number of tasks.

    `clip_model` is a local Hugging Face folder or hub id; by default the config's `paths.clip_img`
    folder, else `paths.clip_img_hub`. Reference embeddings are cached per folder (keyed on the
    photos' names, sizes and mtimes), so `<name>_sim` and `<name>_edit` share one computation and a
    training loop can rank checkpoints without recomputing them.
    """

    def __init__(self, face_backend: str | FaceBackend = "insightface", clip_model: str | None = None,
                 device: str = "auto", config: str | ConfigDict | None = None,
                 insightface_root: str | Path = INSIGHTFACE_ROOT, progress: bool = True):
        self.face = (face_backend if isinstance(face_backend, FaceBackend)
                     else get_face_backend(face_backend, root=insightface_root))
        if clip_model is None:
            paths = (config if isinstance(config, ConfigDict) else load_config(config or DEFAULT_CONFIG)).paths
            clip_model = resolve_pretrained(paths.clip_img, paths.clip_img_hub, "CLIP ViT-B/32 (image scorer)")
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
        photos = reference_photos(ref_dir)
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

    def face_score(self, image: Image.Image, refs: ReferenceSet) -> tuple[bool, float]:
        """(face found, max(0, max over reference faces of the similarity of the image's first face))."""
        embedding = self.face.embed_first(np.asarray(image))
        if embedding is None:
            return False, 0.0
        best = max((self.face.similarity(embedding, ref) for ref in refs.face_embeddings), default=0.0)
        return True, max(0.0, float(best))

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
        text = self.text_features(prompts)
        scored = []
        bar = tqdm(total=len(prompts) * images_per_prompt, desc=f"scoring {task}", unit="img", disable=not self.progress)
        for index, prompt in enumerate(prompts):
            num_tokens = self.count_tokens(prompt)
            if num_tokens > MAX_LENGTH:
                shown = prompt if len(prompt) <= 80 else prompt[:77] + "..."
                warnings.warn(f"{task} prompt {index} has {num_tokens} CLIP tokens (> {MAX_LENGTH}); "
                              f"its text score uses the first {MAX_LENGTH}: {shown!r}", ScoringWarning, stacklevel=2)
            images = []
            for idx in range(images_per_prompt):
                images.append(self._score_image(generated_image_path(output_dir, index, idx), index, idx, refs, text[index]))
                bar.update()
            scored.append(PromptScore(index, prompt, num_tokens, images))
        bar.close()
        result = TaskResult(task, str(ref_dir), str(output_dir), refs.references, scored)
        if result.missing:
            listed = ", ".join(result.missing[:6]) + (", ..." if len(result.missing) > 6 else "")
            warnings.warn(f"{task}: {len(result.missing)} generated image(s) missing or unreadable, scored 0: {listed}",
                          ScoringWarning, stacklevel=2)
        return result

    def score_images(self, ref_dir: str | Path, prompt: str, images: Sequence[Image.Image], index: int = 0) -> PromptScore:
        """Score in-memory images for one prompt, no files involved (e.g. ranking checkpoints while training)."""
        refs = self.references(ref_dir)
        text = self.text_features([prompt])[0]
        scored = [self._score_loaded(image, f"<image {idx}>", index, idx, refs, text) for idx, image in enumerate(images)]
        return PromptScore(index, prompt, self.count_tokens(prompt), scored)

    def _score_image(self, path: Path, index: int, idx: int, refs: ReferenceSet, text: torch.Tensor) -> ImageScore:
        if not path.is_file():
            return ImageScore(str(path), index, idx, found=False, face_found=False, error="missing")
        try:
            image = open_image(path)
        except PhotoError as error:
            return ImageScore(str(path), index, idx, found=False, face_found=False, error=f"unreadable: {error}")
        return self._score_loaded(image, str(path), index, idx, refs, text)

    def _score_loaded(self, image: Image.Image, name: str, index: int, idx: int, refs: ReferenceSet,
                      text: torch.Tensor) -> ImageScore:
        image = image.convert("RGB")
        face_found, face = self.face_score(image, refs)
        features = self.image_features([image])[0]
        clip_img = max(0.0, float((refs.clip @ features).max()))
        clip_text = max(0.0, float(features @ text))
        return ImageScore(name, index, idx, True, face_found, face, clip_img, clip_text)


# --- whole runs ----------------------------------------------------------------------------------

@dataclass
class TaskSpec:
    task: str
    ref_dir: Path
    prompt_file: Path
    output_dir: Path


def detect_split(prompts_dir: str | Path, tasks: Sequence[str]) -> str:
    """"advanced" when the folder holds `<name>_sim.json` / `<name>_edit.json` but no `<name>.json`."""
    prompts_dir = Path(prompts_dir)
    if all((prompts_dir / f"{t}.json").is_file() for t in tasks):
        return "preliminary"
    if any((prompts_dir / f"{t}_{s}.json").is_file() for t in tasks for s in ADVANCED_SPLITS):
        return "advanced"
    return "preliminary"


def plan_tasks(dataset: str | Path, prompts_dir: str | Path, outputs: str | Path, tasks: Sequence[str],
               split: str) -> list[TaskSpec]:
    """Every task to score, checked up front: one error lists every missing folder and file."""
    dataset, prompts_dir, outputs = Path(dataset), Path(prompts_dir), Path(outputs)
    if not tasks:
        raise ScoringError("no tasks to score")
    specs = []
    for subject in tasks:
        names = [f"{subject}_{s}" for s in ADVANCED_SPLITS] if split == "advanced" else [subject]
        specs += [TaskSpec(name, dataset / subject, prompts_dir / f"{name}.json", outputs / name) for name in names]
    problems = []
    for subject in dict.fromkeys(spec.ref_dir for spec in specs):
        if not subject.is_dir():
            problems.append(f"reference photo folder not found: {subject}")
    for spec in specs:
        if not spec.prompt_file.is_file():
            problems.append(f"prompt file not found: {spec.prompt_file}")
        if not spec.output_dir.is_dir():
            problems.append(f"generated images folder not found: {spec.output_dir}")
    if problems:
        raise ScoringError("cannot score:\n  " + "\n  ".join(problems))
    return specs


def score_outputs(dataset: str | Path = "./train_data", prompts: str | Path = "./eval_prompts",
                  outputs: str | Path = "./outputs", tasks: Sequence[str] = DEFAULT_TASKS,
                  advanced: bool | None = None, scorer: Scorer | None = None, report: bool = True,
                  **scorer_kwargs) -> ScoreResult:
    """Score `outputs/<task>/` for every task; `advanced=None` detects the split from the prompt files.

    Writes score_results.json / .csv and score_report.html into `outputs` when `report` is true.
    `scorer_kwargs` build a `Scorer` when none is given.
    """
    split = "advanced" if advanced else ("preliminary" if advanced is False else detect_split(prompts, tasks))
    specs = plan_tasks(dataset, prompts, outputs, tasks, split)
    scorer = scorer or Scorer(**scorer_kwargs)
    result = ScoreResult(split, scorer.face.name, scorer.face.comparable_with_competition)
    for spec in specs:
        result.tasks[spec.task] = scorer.score_task(spec.ref_dir, load_prompts(spec.prompt_file), spec.output_dir, spec.task)
    if report:
        write_reports(result, outputs)
    return result


# --- reports -------------------------------------------------------------------------------------

CSV_FIELDS = ("task", "prompt_index", "idx", "path", "found", "face_found", "face", "clip_img", "clip_text",
              "error", "prompt")


def write_reports(result: ScoreResult, folder: str | Path) -> dict[str, Path]:
    """score_results.json (everything), score_results.csv (one row per image), score_report.html."""
    folder = Path(folder)
    paths = {"json": folder / RESULTS_JSON, "csv": folder / RESULTS_CSV, "html": folder / REPORT_HTML}
    save_json(result.to_dict(), paths["json"])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for name, task in result.tasks.items():
        for prompt in task.prompts:
            for image in prompt.images:
                writer.writerow({"task": name, **{k: getattr(image, k) for k in CSV_FIELDS[1:-1]}, "prompt": prompt.prompt})
    with atomic_path(paths["csv"]) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")
    with atomic_path(paths["html"]) as tmp:
        tmp.write_text(render_html(result, folder), encoding="utf-8")
    return paths


def _src(path: str | Path, base: Path) -> str:
    """A relative, URL-quoted image link, so the report keeps working when the repository moves."""
    return quote(Path(os.path.relpath(Path(path).resolve(), base.resolve())).as_posix())


def _cell(value: float) -> str:
    hue = int(120 * min(1.0, max(0.0, value)))  # red (0) -> green (1)
    return f'<td style="background:hsl({hue},70%,85%)">{value:.3f}</td>'


_STYLE = """body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:.2em .5em;text-align:right}th{background:#eee}
.refs img{height:128px;margin:2px;border:3px solid #6c6}.refs img.noface{border-color:#d44}
.prompt{margin:1em 0;padding:.5em;border-top:1px solid #ccc}.gen{display:inline-block;margin:4px;vertical-align:top;font-size:.85em}
.gen img{width:192px;height:192px;object-fit:cover;display:block}.missing{width:192px;height:192px;background:#fdd;
display:flex;align-items:center;justify-content:center}.warn{color:#b40}"""


def render_html(result: ScoreResult, base: str | Path) -> str:
    """One page: the summary, then per task its reference photos and each prompt's images with their scores."""
    base = Path(base)
    esc = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>score report</title><style>{_STYLE}</style>",
           "</head><body><h1>Score report</h1>",
           f"<p>split: <b>{result.split}</b> &middot; face backend: <b>{esc(result.face_backend)}</b>"]
    if not result.comparable_with_competition:
        out.append(" <span class='warn'>(face scores not comparable with competition numbers)</span>")
    out.append("</p><table><tr>" + "".join(f"<th>{esc(k)}</th>" for k in result.summary) + "</tr><tr>"
               + "".join(_cell(v) for v in result.summary.values()) + "</tr></table>")
    out.append("<table><tr><th>task</th><th>face</th><th>clip_img</th><th>clip_text</th><th>face detected</th>"
               "<th>reference faces</th><th>missing</th></tr>")
    for name, task in result.tasks.items():
        out.append(f"<tr><th><a href='#{esc(name)}'>{esc(name)}</a></th>{_cell(task.face)}{_cell(task.clip_img)}"
                   f"{_cell(task.clip_text)}<td>{task.face_detection_rate:.0%}</td>"
                   f"<td>{task.reference_faces}/{len(task.references)}</td><td>{len(task.missing)}</td></tr>")
    out.append("</table>")
    for name, task in result.tasks.items():
        out.append(f"<h2 id='{esc(name)}'>{esc(name)}</h2><p>references ({esc(task.ref_dir)}; red border = no face "
                   "detected, not used for the face score):</p><div class='refs'>")
        for ref in task.references:
            css = "" if ref.face_found else " class='noface'"
            out.append(f"<img{css} src='{_src(ref.path, base)}' title='{esc(Path(ref.path).name)}'>")
        out.append("</div>")
        if task.reference_faces == 0:
            out.append("<p class='warn'>No face found in any reference photo: face score is 0 for this task.</p>")
        for prompt in task.prompts:
            note = f" <span class='warn'>({prompt.num_tokens} tokens, truncated to {MAX_LENGTH})</span>" if prompt.truncated else ""
            out.append(f"<div class='prompt'><b>{prompt.index}</b>: {esc(prompt.prompt)}{note}<br>mean: face "
                       f"{prompt.face:.3f} &middot; clip_img {prompt.clip_img:.3f} &middot; clip_text {prompt.clip_text:.3f}<br>")
            for image in prompt.images:
                if image.found:
                    picture = f"<img src='{_src(image.path, base)}'>"
                    face = f"face {image.face:.3f}" if image.face_found else "<span class='warn'>no face</span>"
                    caption = f"{face}<br>clip_img {image.clip_img:.3f}<br>clip_text {image.clip_text:.3f}"
                else:
                    picture = f"<div class='missing'>{esc(image.error or 'missing')}</div>"
                    caption = "all scores 0"
                out.append(f"<div class='gen'>{picture}{esc(Path(image.path).name)}<br>{caption}</div>")
            out.append("</div>")
    out.append("</body></html>")
    return "\n".join(out)
