"""What a person reads after scoring: score_results.json (everything), score_results.csv (one row per
image), score_report.html (reference photos, every generated image and its scores) and the lines
score.py prints (the summary dict(s) last: the graders read them).

One split's JSON is that split's `ScoreResult.to_dict()`; when both splits were scored, the file holds
`{"summaries": {split: summary}, "splits": {split: ScoreResult.to_dict()}}`.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

from libs.files import atomic_path, save_json
from libs.outputs import check_output_file
from libs.score.candidates import (CANDIDATES_DIR, CANDIDATES_FILE, CandidateRecord, CandidatesFileError,
                                   load_record)
from libs.models.clip import MAX_LENGTH
from libs.layout import ADVANCED_SPLITS, MODEL_OUTPUT
from libs.report.html import STYLE, esc, rel_link, score_cell, td
from libs.report.trained import TrainedSubject, find_training
from libs.score.metrics import METRIC_NAMES, METRICS
from libs.score.results import ScoreResult, TaskResult

RESULTS_JSON = "score_results.json"
RESULTS_CSV = "score_results.csv"
REPORT_HTML = "score_report.html"
CSV_FIELDS = ("task", "prompt_index", "idx", "path", "found", "face_found", *METRIC_NAMES, "error", "prompt")


def results_json(results: Sequence[ScoreResult]) -> dict:
    """The JSON report's content: one split as it always was, several as dicts labelled by split."""
    if len(results) == 1:
        return results[0].to_dict()
    return {"summaries": {result.split: result.summary for result in results},
            "splits": {result.split: result.to_dict() for result in results}}


def check_report_files(folder: str | Path) -> None:
    """Before any scoring: each report file's path in `folder` can take it (not a folder, its folder writable)."""
    for name in (RESULTS_JSON, RESULTS_CSV, REPORT_HTML):
        check_output_file(Path(folder) / name, "score report")


def write_reports(results: Sequence[ScoreResult], folder: str | Path,
                  model_output: str | Path | None = None) -> dict[str, Path]:
    """score_results.json, score_results.csv and score_report.html in `folder`, each written atomically; the
    page links each subject to its training in `model_output` (default: `model_output/` beside `folder`)."""
    folder = Path(folder)
    paths = {"json": folder / RESULTS_JSON, "csv": folder / RESULTS_CSV, "html": folder / REPORT_HTML}
    save_json(results_json(results), paths["json"])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for result in results:
        for name, task in result.tasks.items():
            for prompt in task.prompts:
                for image in prompt.images:
                    writer.writerow({"task": name, **{k: getattr(image, k) for k in CSV_FIELDS[1:-1]},
                                     "prompt": prompt.prompt})
    with atomic_path(paths["csv"]) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")
    with atomic_path(paths["html"]) as tmp:
        tmp.write_text(render_html(results, folder, model_output), encoding="utf-8")
    return paths


# --- the console ---------------------------------------------------------------------------------

def task_lines(results: Sequence[ScoreResult]) -> list[str]:
    """One line per task (its three means, face detection rate, reference faces, missing images)."""
    lines = [f"{name:12s} " + "  ".join(f"{metric} {value:.4f}" for metric, value in task.means().items())
             + f"  faces {task.face_detection_rate:.0%}  ref faces {task.reference_faces}/{len(task.references)}  "
             f"missing {len(task.missing)}"
             for result in results for name, task in result.tasks.items()]
    incomparable = next((r for r in results if not r.comparable_with_competition), None)
    if incomparable is not None:
        lines.append(f"NOTE: face scores come from the {incomparable.face_backend} backend and are not comparable "
                     "with competition numbers")
    return lines


def summary_lines(results: Sequence[ScoreResult], labels: Sequence[str]) -> list[str]:
    """The summary dict of one split as the last line, as the graders read it; with several splits each
    dict follows its label line (so the last line is still a dict: the last split's)."""
    if len(results) == 1:
        return [str(results[0].summary)]
    return [line for label, result in zip(labels, results, strict=True) for line in (label, str(result.summary))]


# --- the HTML page -------------------------------------------------------------------------------

# best-of-N candidates beside a prompt's kept images (green = kept)
CANDIDATE_STYLE = """.cands{margin-top:.3em}.cand{display:inline-block;margin:2px;font-size:.75em;vertical-align:top}
.cand img{width:96px;height:96px;object-fit:cover;display:block;border:3px solid #ddd}.cand img.kept{border-color:#6c6}"""


def render_html(results: Sequence[ScoreResult], base: str | Path, model_output: str | Path | None = None) -> str:
    """One page: per split its summary and task table, what training predicted for each subject (with a link
    to its run report), then per task its reference photos and each prompt's images with their scores.
    Links are relative to `base` (the folder the page is written to)."""
    base = Path(base)
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>score report</title><style>{STYLE}{CANDIDATE_STYLE}</style>",
           "</head><body><h1>Score report</h1>"]
    for result in results:
        out += _split_summary(result)
    out += _training_section(results, Path(model_output) if model_output else base.parent / MODEL_OUTPUT, base)
    for result in results:
        for name, task in result.tasks.items():
            out += _task_section(name, task, base)
    out.append("</body></html>")
    return "\n".join(out)


def _split_summary(result: ScoreResult) -> list[str]:
    out = [f"<p>split: <b>{result.split}</b> &middot; face backend: <b>{esc(result.face_backend)}</b>"]
    if not result.comparable_with_competition:
        out.append(" <span class='warn'>(face scores not comparable with competition numbers)</span>")
    out.append("</p><table><tr>" + "".join(f"<th>{esc(k)}</th>" for k in result.summary) + "</tr><tr>"
               + "".join(score_cell(v) for v in result.summary.values()) + "</tr></table>")
    out.append("<table><tr><th>task</th>" + "".join(f"<th title='{esc(m.label)}'>{m.name}</th>" for m in METRICS)
               + "<th>face detected</th><th>reference faces</th><th>missing</th></tr>")
    for name, task in result.tasks.items():
        out.append(f"<tr><th><a href='#{esc(name)}'>{esc(name)}</a></th>"
                   + "".join(score_cell(value) for value in task.means().values())
                   + f"<td>{task.face_detection_rate:.0%}</td>"
                   f"<td>{task.reference_faces}/{len(task.references)}</td><td>{len(task.missing)}</td></tr>")
    out.append("</table>")
    return out


def _task_section(name: str, task: TaskResult, base: Path) -> list[str]:
    out = [f"<h2 id='{esc(name)}'>{esc(name)}</h2><p>references ({esc(task.ref_dir)}; red border = no face "
           "detected, not used for the face score):</p><div class='refs'>"]
    for ref in task.references:
        css = "" if ref.face_found else " class='noface'"
        out.append(f"<img{css} src='{rel_link(ref.path, base)}' title='{esc(Path(ref.path).name)}'>")
    out.append("</div>")
    if task.reference_faces == 0:
        out.append("<p class='warn'>No face found in any reference photo: face score is 0 for this task.</p>")
    try:
        record = load_record(task.output_dir)
    except CandidatesFileError as error:
        record = None
        out.append(f"<p class='warn'>best-of-N candidates not shown: {esc(str(error))}</p>")
    for prompt in task.prompts:
        note = f" <span class='warn'>({prompt.num_tokens} tokens, truncated to {MAX_LENGTH})</span>" if prompt.truncated else ""
        means = " &middot; ".join(f"{metric} {value:.3f}" for metric, value in prompt.means().items())
        out.append(f"<div class='prompt'><b>{prompt.index}</b>: {esc(prompt.prompt)}{note}<br>mean: {means}<br>")
        for image in prompt.images:
            if image.found:
                picture = f"<img src='{rel_link(image.path, base)}'>"
                caption = "<br>".join("<span class='warn'>no face</span>" if metric == "face" and not image.face_found
                                      else f"{metric} {value:.3f}" for metric, value in image.scores.items())
            else:
                picture = f"<div class='missing'>{esc(image.error or 'missing')}</div>"
                caption = "all scores 0"
            out.append(f"<div class='gen'>{picture}{esc(Path(image.path).name)}<br>{caption}</div>")
        if record is not None:
            out += _candidates(record, prompt.index, Path(task.output_dir), base)
        out.append("</div>")
    return out


def _candidates(record: CandidateRecord, index: int, output_dir: Path, base: Path) -> list[str]:
    """The prompt's best-of-N candidates (from candidates.json) beside its kept images, best first; green = kept."""
    entries = sorted(record.of_prompt(index), key=lambda c: (-c.objective, c.candidate))
    if not entries:
        return []
    out = [f"<div class='cands'>best-of-{esc(str(record.settings.get('candidates', '?')))} candidates "
           f"({esc(str(record.settings.get('objective', '')))}; {CANDIDATES_FILE}):<br>"]
    for entry in entries:
        css = " class='kept'" if entry.kept else ""
        kept = f"kept as {esc(entry.kept_as)}" if entry.kept else "not kept"
        out.append(f"<div class='cand'><img{css} src='{rel_link(output_dir / CANDIDATES_DIR / entry.file, base)}'>"
                   f"{entry.file} &middot; {entry.objective:.3f}<br>{kept}</div>")
    out.append("</div>")
    return out


def subject_of(task: str) -> str:
    """The subject a task renders: `boy1_sim` and `boy1_edit` are boy1's."""
    for split in ADVANCED_SPLITS:
        if task.endswith(f"_{split}"):
            return task[: -len(split) - 1]
    return task


def _training_section(results: Sequence[ScoreResult], model_output: Path, base: Path) -> list[str]:
    """Per subject: its training report, and the numbers validation predicted for the chosen step next to the
    numbers scored here (validation renders the advanced split's shape: sim and edit prompts)."""
    trained: dict[str, TrainedSubject] = {}
    scored: dict[str, list[tuple[str, TaskResult]]] = {}
    for result in results:
        for name, task in result.tasks.items():
            subject = subject_of(name)
            found = trained.get(subject) or find_training(model_output, subject)
            if found is not None:
                trained[subject] = found
                scored.setdefault(subject, []).append((name, task))
    if not trained:
        return []
    rows = []
    for subject, training in trained.items():
        page = (f"<a href='{rel_link(training.report, base)}'>training report</a>"
                if training.report is not None else "no report")
        head = (f"<th class='text' rowspan='{{n}}' id='training-{esc(subject)}'>{esc(subject)}<br>{page}</th>")
        lines = []
        for split in ADVANCED_SPLITS:
            if any(key.startswith(f"{split}_") for key in training.predicted):
                numbers = [training.predicted.get(f"{split}_{m}") for m in METRIC_NAMES]  # None: not reported
                lines.append([td(f"validation, step {training.chosen_step} ({training.face_backend} faces)", text=True),
                              td(split, text=True), *(score_cell(v) for v in numbers)])
        for name, task in scored[subject]:
            split = name[len(subject) + 1:] or "preliminary"
            lines.append([td("scored here", text=True), td(split, text=True),
                          *(score_cell(value) for value in task.means().values())])
        for number, cells in enumerate(lines):
            rows.append("<tr>" + (head.format(n=len(lines)) if number == 0 else "") + "".join(cells) + "</tr>")
    return ["<h2>Training</h2><p class='note'>each subject's training report, and the numbers its validation "
            "predicted for the chosen step next to the numbers scored here (other prompts and seeds: expect the "
            "same order, not the same values)</p><table class='training'><tr><th>subject</th><th>source</th>"
            "<th>split</th>" + "".join(f"<th>{m}</th>" for m in METRIC_NAMES) + "</tr>", *rows, "</table>"]

