"""What a person reads after scoring: score_results.json (everything), score_results.csv (one row per
image), score_report.html (reference photos, every generated image and its scores) and the lines
score.py prints (the summary dict(s) last: the graders read them).

One split's JSON is that split's `ScoreResult.to_dict()`; when both splits were scored, the file holds
`{"summaries": {split: summary}, "splits": {split: ScoreResult.to_dict()}}`.
"""
from __future__ import annotations

import csv
import html
import io
import os
from pathlib import Path
from typing import Sequence
from urllib.parse import quote

from libs.files import atomic_path, save_json
from libs.score.candidates import (CANDIDATES_DIR, CANDIDATES_FILE, CandidateRecord, CandidatesFileError,
                                   load_record)
from libs.models.clip import MAX_LENGTH
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


def write_reports(results: Sequence[ScoreResult], folder: str | Path) -> dict[str, Path]:
    """score_results.json, score_results.csv and score_report.html in `folder`, each written atomically."""
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
        tmp.write_text(render_html(results, folder), encoding="utf-8")
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
display:flex;align-items:center;justify-content:center}.warn{color:#b40}
.cands{margin-top:.3em}.cand{display:inline-block;margin:2px;font-size:.75em;vertical-align:top}
.cand img{width:96px;height:96px;object-fit:cover;display:block;border:3px solid #ddd}.cand img.kept{border-color:#6c6}"""


def render_html(results: Sequence[ScoreResult], base: str | Path) -> str:
    """One page: per split its summary and task table, then per task its reference photos and each prompt's
    images with their scores. Image links are relative to `base` (the folder the page is written to)."""
    base = Path(base)
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>score report</title><style>{_STYLE}</style>",
           "</head><body><h1>Score report</h1>"]
    for result in results:
        out += _split_summary(result)
    for result in results:
        for name, task in result.tasks.items():
            out += _task_section(name, task, base)
    out.append("</body></html>")
    return "\n".join(out)


def _split_summary(result: ScoreResult) -> list[str]:
    esc = html.escape
    out = [f"<p>split: <b>{result.split}</b> &middot; face backend: <b>{esc(result.face_backend)}</b>"]
    if not result.comparable_with_competition:
        out.append(" <span class='warn'>(face scores not comparable with competition numbers)</span>")
    out.append("</p><table><tr>" + "".join(f"<th>{esc(k)}</th>" for k in result.summary) + "</tr><tr>"
               + "".join(_cell(v) for v in result.summary.values()) + "</tr></table>")
    out.append("<table><tr><th>task</th>" + "".join(f"<th title='{esc(m.label)}'>{m.name}</th>" for m in METRICS)
               + "<th>face detected</th><th>reference faces</th><th>missing</th></tr>")
    for name, task in result.tasks.items():
        out.append(f"<tr><th><a href='#{esc(name)}'>{esc(name)}</a></th>"
                   + "".join(_cell(value) for value in task.means().values())
                   + f"<td>{task.face_detection_rate:.0%}</td>"
                   f"<td>{task.reference_faces}/{len(task.references)}</td><td>{len(task.missing)}</td></tr>")
    out.append("</table>")
    return out


def _task_section(name: str, task: TaskResult, base: Path) -> list[str]:
    esc = html.escape
    out = [f"<h2 id='{esc(name)}'>{esc(name)}</h2><p>references ({esc(task.ref_dir)}; red border = no face "
           "detected, not used for the face score):</p><div class='refs'>"]
    for ref in task.references:
        css = "" if ref.face_found else " class='noface'"
        out.append(f"<img{css} src='{_src(ref.path, base)}' title='{esc(Path(ref.path).name)}'>")
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
                picture = f"<img src='{_src(image.path, base)}'>"
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
    out = [f"<div class='cands'>best-of-{html.escape(str(record.settings.get('candidates', '?')))} candidates "
           f"({html.escape(str(record.settings.get('objective', '')))}; {CANDIDATES_FILE}):<br>"]
    for entry in entries:
        css = " class='kept'" if entry.kept else ""
        kept = f"kept as {html.escape(entry.kept_as)}" if entry.kept else "not kept"
        out.append(f"<div class='cand'><img{css} src='{_src(output_dir / CANDIDATES_DIR / entry.file, base)}'>"
                   f"{entry.file} &middot; {entry.objective:.3f}<br>{kept}</div>")
    out.append("</div>")
    return out
