"""`<out>/report.html`: what one training run did and decided, from the files the run writes.

Read through their owners: train_config.json (libs/train/records.py), logs/train_log.jsonl
(libs/train/logs.py), personalization.json's selection record (libs/personalization/, libs/train/selection.py),
the validation images and prompt files (names in libs/train_output.py), crops.json (libs/photos.py), the
curves (libs/train/curves.py). Written at every validation (the table so far, "best so far") and at the end
of the run (the chosen step and why). The photos' thumbnails are made under `report_files/`, so every link
stays inside the run folder and the folder can be moved or zipped.
"""
from __future__ import annotations

import io
import statistics
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from libs.files import CheckpointError, save_bytes
from libs.layout import ADVANCED_SPLITS
from libs.personalization import read_meta
from libs.photos import PhotoError, face_boxes, open_image
from libs.prompts import PromptFileError, image_name, load_prompts
from libs.report.html import esc, img, page, score_cell, table, td, write_page
from libs.train.images import training_square
from libs.train.logs import read_log
from libs.train.records import read_run_file
from libs.train.selection import METRICS, Selection
from libs.train_output import (CURVES_FILE, META_FILE, PROMPTS_DIR, REPORT_FILE, REPORT_FILES_DIR, VALIDATION_DIR,
                               validation_step_dir)

THUMB_HEIGHT = 240
FACE_COLOUR, SQUARE_COLOUR = (40, 200, 40), (255, 190, 0)


def write_run_report(out_dir: str | Path, running: Selection | None = None) -> Path:
    """Write `<out_dir>/report.html` (atomically) and return its path. `running`: the selection of a run in
    progress (its best step so far is marked); without it the finished run's personalization.json says
    which step was chosen and why."""
    out = Path(out_dir)
    run = read_run_file(out) or {}
    log = read_log(out)
    selection = _selection(out, running)
    validations = _validations(log)
    body = [f"<h1>Training run: {esc(out.name)}</h1>", _status(run, selection, running is not None)]
    body += _warnings(selection, validations)
    body += _settings(run, log, selection)
    body += _photos(out, run)
    body += _curves(out)
    body += _selection_table(validations, selection)
    body += _images(out, validations, selection)
    return write_page(page(f"training run {out.name}", body), out / REPORT_FILE)


def _selection(out: Path, running: Selection | None) -> dict[str, Any]:
    """The finished run's record, or the running selection's state in the record's shape."""
    if running is not None:
        mode = running.mode
        best = running.best if mode == "best" else None
        reason = ("the highest objective so far (the run is in progress)" if best is not None
                  else "the last step (--selection last)" if mode == "last" else "none yet (the run is in progress)")
        return {"mode": mode, "chosen_step": best, "reason": reason, "objective_used": str(running.used_objective),
                "face_backend": running.face_backend, "face_usable": running.face_usable, "warnings": []}
    if not (out / META_FILE).is_file():
        return {"chosen_step": None, "reason": "not chosen yet (no personalization.json)", "warnings": []}
    try:
        meta = read_meta(out)
    except CheckpointError as error:
        return {"chosen_step": None, "reason": f"unknown: {error}", "warnings": []}
    record = dict(meta.get("selection") or {"chosen_step": meta.get("steps"), "reason": "not recorded"})
    record["warnings"] = list(meta.get("warnings") or [])
    record["trainable_parameters"] = meta.get("trainable_parameters")
    return record


def _validations(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The validation lines with the metric (one per validated step; a resumed run's log holds each once)."""
    by_step = {line["step"]: line for line in log if isinstance(line.get("objective"), (int, float))}
    return [by_step[step] for step in sorted(by_step)]


def _status(run: dict[str, Any], selection: dict[str, Any], running: bool) -> str:
    chosen = selection.get("chosen_step")
    what = "in progress" if running else "finished" if chosen is not None else "unfinished"
    text = f"<p>Run {what}."
    if chosen is not None:
        text += f" Adapters {'so far' if running else 'written'}: <b>step {chosen}</b> ({esc(selection.get('reason'))})."
    return text + f" <span class='note'>Command: {esc(' '.join(run.get('command') or []))}</span></p>"


def _warnings(selection: dict[str, Any], validations: list[dict[str, Any]]) -> list[str]:
    """The run's warnings (personalization.json's) and what the face scores are worth."""
    notes = list(selection.get("warnings") or [])
    backend = selection.get("face_backend") or next((v.get("face_backend") for v in validations), None)
    if backend == "none":
        notes.append("no face model was usable: every face score is 0 and the step was chosen by CLIP image/text "
                     "similarity (install insightface with buffalo_l, or dlib)")
    elif selection.get("face_usable") is False:
        notes.append(f"no face found by {backend} in any subject photo: face scores are 0 and the step was chosen "
                     "by CLIP image/text similarity")
    if backend == "dlib":
        notes.append("face scores come from dlib: they rank steps, but are not comparable with the competition's "
                     "insightface numbers")
    if not notes:
        return []
    return ["<h2>Warnings</h2><ul class='warn'>", *(f"<li>{esc(n)}</li>" for n in notes), "</ul>"]


def _settings(run: dict[str, Any], log: list[dict[str, Any]], selection: dict[str, Any]) -> list[str]:
    """The settings that shape the result, and the time it took."""
    cfg = (run.get("config") or {}).get("train", {})
    config = run.get("config") or {}
    data_dir = run.get("data_dir", "")
    photos = [s for s in run.get("images") or [] if Path(s.get("file", "")).parent == Path(data_dir)]
    classes = len(run.get("images") or []) - len(photos)
    class_dir = run.get("class_dir")
    captions = repr(cfg["class_prompt"]) if cfg.get("class_prompt") else "the class set's captions"
    prior = (f"{classes} class images from {class_dir}, prompts: {captions}, weight "
             f"{cfg.get('prior_loss_weight')}" if classes and class_dir not in (None, "None") else "off")
    lora = (f"U-ViT LoRA r={cfg.get('rank')} alpha={cfg.get('alpha')} on {', '.join(cfg.get('lora_targets') or [])}; "
            f"text encoder: {cfg.get('text_encoder_mode')}")
    parameters = selection.get("trainable_parameters") or run.get("trainable_parameters")
    per_step, total, validating = _timing(log)
    rows = [
        ("subject photos", f"{len(photos)} from {data_dir} (class word {run.get('class_word')!r}, prompt "
                           f"{run.get('instance_prompt')!r})"),
        ("class set (prior preservation)", prior),
        ("adapter", lora),
        ("changed parameters", f"{parameters:,}" if isinstance(parameters, int) else "unknown"),
        ("steps", f"{cfg.get('train_step')} x batch {cfg.get('batch_size')}, lr {cfg.get('lr')}, "
                  f"text lr {cfg.get('text_lr')}, resolution {config.get('resolution')}"),
        ("validation", _validation_setting(cfg)),
        ("selection", f"{selection.get('mode', cfg.get('selection'))}, objective "
                      f"{selection.get('objective_used') or cfg.get('objective')}"),
        ("seed", str(config.get("seed"))),
        ("device", f"{run.get('device', 'unknown')}, mixed precision {run.get('mixed_precision')}, "
                   f"{run.get('num_processes')} process(es)"),
        ("time per step", f"{per_step:.3f} s (median, validation left out)" if per_step is not None else "unknown"),
        ("total time", f"{total:.0f} s from the encodings to the last logged step, {validating:.0f} s of it "
                       "validating" if total is not None else "unknown"),
        ("versions", ", ".join(f"{k} {v}" for k, v in (run.get("versions") or {}).items()
                               if k in ("torch", "peft", "transformers", "git_commit"))),
    ]
    return ["<h2>Settings</h2>", table(["setting", "value"], [[f"<th class='text'>{esc(k)}</th>", td(v, text=True)]
                                                              for k, v in rows], css="settings")]


def _validation_setting(cfg: dict[str, Any]) -> str:
    if not cfg.get("validation_steps"):
        return "fixed-noise loss only (validation_steps 0): the last step is kept"
    sim, edit = len(cfg.get("validation_sim_prompts") or []), len(cfg.get("validation_edit_prompts") or [])
    return (f"every {cfg['validation_steps']} steps and at the last: {sim} sim + {edit} edit prompts x "
            f"{cfg.get('validation_images')} images, {cfg.get('validation_sample_steps')} solver steps, face backend "
            f"{cfg.get('validation_face_backend')}")


def _timing(log: list[dict[str, Any]]) -> tuple[float | None, float | None, float]:
    """(median seconds per training step, total seconds, seconds validating). `elapsed_s` restarts with each
    process (a resumed run), so the total adds up the segments; the rendering and scoring of validations
    between two logged steps is taken out of their interval."""
    per_step: list[float] = []
    total, segment_end, validating, validated_since = 0.0, 0.0, 0.0, 0.0
    previous: dict[str, Any] | None = None
    for line in log:
        if "validation_render_s" in line:
            seconds = float(line["validation_render_s"]) + float(line.get("validation_score_s", 0.0))
            validating += seconds
            validated_since += seconds
        if "elapsed_s" not in line:
            continue
        elapsed = float(line["elapsed_s"])
        if previous is not None and elapsed >= previous["elapsed_s"]:
            if line["step"] > previous["step"]:
                per_step.append((elapsed - previous["elapsed_s"] - validated_since) / (line["step"] - previous["step"]))
        elif previous is not None:
            total += segment_end  # a new process: the previous segment ended at its last line
        segment_end, previous, validated_since = elapsed, line, 0.0
    if previous is None:
        return None, None, validating
    return (statistics.median(per_step) if per_step else None), total + segment_end, validating


def _photos(out: Path, run: dict[str, Any]) -> list[str]:
    """Thumbnails of the subject photos with the face box (crops.json, green) and the square trained on (amber)."""
    data_dir = Path(run.get("data_dir", ""))
    sources = [s for s in run.get("images") or [] if Path(s.get("file", "")).parent == data_dir]
    if not sources:
        return []
    resolution = int((run.get("config") or {}).get("resolution", 512))
    boxes = face_boxes(data_dir) if data_dir.is_dir() else {}
    figures = []
    for source in sources:
        path = Path(source["file"])
        framing = source.get("crop", "")
        thumb = out / REPORT_FILES_DIR / f"photo-{str(source.get('sha256', path.stem))[:16]}.jpg"  # made once per photo
        if not thumb.is_file():
            try:
                photo = open_image(path)
            except PhotoError as error:
                figures.append(f"<figure>{esc(path.name)}<br><span class='warn'>unreadable now: {esc(error)}</span>"
                               "</figure>")
                continue
            box = boxes.get(path.name)
            square = (training_square(photo.size, resolution, box) if box is not None or framing.startswith("center")
                      else None)
            save_bytes(_thumbnail(photo, box, square), thumb)
        figures.append(f"<figure>{img(thumb, out, path.name)}{esc(path.name)}<br>{esc(framing)}</figure>")
    return ["<h2>Subject photos</h2><p class='note'>green: the face box of crops.json; amber: the square the "
            "training cut (resized to the training resolution)</p><div class='thumbs'>", *figures, "</div>"]


def _thumbnail(photo: Image.Image, box: tuple[float, ...] | None, square: tuple[float, ...] | None) -> bytes:
    scale = THUMB_HEIGHT / photo.height
    thumb = photo.resize((max(1, round(photo.width * scale)), THUMB_HEIGHT), Image.BICUBIC)
    draw = ImageDraw.Draw(thumb)
    for rect, colour in ((square, SQUARE_COLOUR), (box, FACE_COLOUR)):
        if rect is not None:
            draw.rectangle([v * scale for v in rect], outline=colour, width=3)
    buffer = io.BytesIO()
    thumb.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _curves(out: Path) -> list[str]:
    path = out / VALIDATION_DIR / CURVES_FILE
    if not path.is_file():
        return ["<h2>Curves</h2><p class='note'>No curves: they are drawn at each validation with the metric "
                "(validation_steps &gt; 0); the losses are in logs/train_log.jsonl.</p>"]
    return ["<h2>Curves</h2><p class='note'>the five validation numbers, the objective and the losses against the "
            f"step; the dashed line is the chosen step</p>{img(path, out, 'validation curves', 'plot')}"]


def _selection_table(validations: list[dict[str, Any]], selection: dict[str, Any]) -> list[str]:
    """Every validated step with its five numbers and objective; the chosen step's row highlighted."""
    chosen = selection.get("chosen_step")
    head = ["<h2>Selection</h2>", f"<p>Chosen: <b>{'step ' + str(chosen) if chosen is not None else 'none yet'}</b> "
            f"&mdash; {esc(selection.get('reason'))}. Objective: <code>{esc(selection.get('objective_used', ''))}"
            "</code> (higher is better).</p>"]
    if not validations:
        return head + ["<p class='note'>No validated step: validation with the metric is off (validation_steps 0), "
                       "so the last step's adapters are kept.</p>"]
    rows = [[f"<th>{v['step']}</th>", *(score_cell(v.get(m)) for m in METRICS), td(v["objective"], 4),
             td(v.get("eval_loss_instance"), 4)] for v in validations]
    return head + [table(["step", *METRICS, "objective", "fixed-noise loss"], rows,
                         [v["step"] == chosen for v in validations], css="selection",
                         row_ids=[f"step-{v['step']}" for v in validations])]


def _images(out: Path, validations: list[dict[str, Any]], selection: dict[str, Any]) -> list[str]:
    """The validation images: one row per validated step, one column per (prompt, image), the prompt under
    each column, so drift across steps reads down a column."""
    folder = out / VALIDATION_DIR
    columns: list[tuple[str, str, int]] = []  # (task folder, prompt, prompt index)
    for split in ADVANCED_SPLITS:
        for prompt_file in sorted((folder / PROMPTS_DIR).glob(f"*_{split}.json")):
            try:
                prompts = load_prompts(prompt_file)
            except PromptFileError:
                continue
            columns += [(prompt_file.stem, prompt, index) for index, prompt in enumerate(prompts)]
    steps = [v["step"] for v in validations if validation_step_dir(out, v['step']).is_dir()]
    if not columns or not steps:
        return []
    per_prompt = max(1, max(len(list((validation_step_dir(out, s) / task).glob(f"{i}-*.jpg")))
                            for s in steps for task, _, i in columns))
    captions = "".join(f"<th class='prompt' colspan='{per_prompt}'>{esc(task.rsplit('_', 1)[-1])}: {esc(prompt)}</th>"
                       for task, prompt, _ in columns)
    rows = []
    for step in steps:
        cells = []
        for task, prompt, index in columns:
            for idx in range(per_prompt):
                path = validation_step_dir(out, step) / task / image_name(index, idx)
                cells.append(f"<td>{img(path, out, f'step {step}: {prompt} #{idx}')}</td>" if path.is_file()
                             else "<td class='missing'>missing</td>")
        css = " class='chosen'" if step == selection.get("chosen_step") else ""
        rows.append(f"<tr{css}><th>{step}</th>{''.join(cells)}</tr>")
    return ["<h2>Validation images</h2><p class='note'>one row per validated step (the chosen one highlighted), "
            "the same fixed noise in every row: a column shows what training changed</p>",
            f"<table class='images'><tr><th>step</th>{captions}</tr>", *rows,
            f"<tr><th></th>{captions}</tr></table>"]
