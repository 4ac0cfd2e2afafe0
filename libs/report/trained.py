"""What training said about a subject, for the score report: the page to open (the run report, or the
search report of an --auto_recipe folder) and the five numbers validation predicted for the chosen step.

Read from `model_output/<name>/personalization.json` (libs/personalization.py): its `selection` holds every
validated step's numbers and the chosen step; an `auto_recipe` record marks a search (its report is the search's).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from libs.files import CheckpointError
from libs.personalization import read_meta
from libs.train_output import AUTO_DIR, META_FILE, REPORT_FILE

@dataclass
class TrainedSubject:
    name: str
    folder: Path
    report: Path | None  # the page to open, when it is there
    chosen_step: int | None
    predicted: dict[str, float] = field(default_factory=dict)  # sim_face ... edit_clip_text of the chosen step
    face_backend: str | None = None


def find_training(model_output: str | Path, name: str) -> TrainedSubject | None:
    """The training behind `model_output/<name>`; None when there is no readable personalization there."""
    folder = Path(model_output) / name
    if not (folder / META_FILE).is_file():
        return None
    try:
        meta = read_meta(folder)
    except CheckpointError:
        return None
    selection = meta.get("selection") or {}
    chosen = selection.get("chosen_step")
    page = folder / AUTO_DIR / REPORT_FILE if meta.get("auto_recipe") else folder / REPORT_FILE
    scores = (selection.get("scores") or {}).get(str(chosen)) or {}
    predicted = {k: float(v) for k, v in scores.items() if isinstance(v, (int, float)) and k != "objective"}
    return TrainedSubject(name, folder, page if page.is_file() else None, chosen if isinstance(chosen, int) else None,
                          predicted, selection.get("face_backend"))
