"""Best-of-N's record of what it chose from: `<output>/candidates/{prompt}-{k:03}.jpg` (every candidate, named
by its noise index k) and `<output>/candidates.json` (per candidate: prompt index, candidate index, noise key,
face / clip_img / clip_text, objective, kept or not), written by `sample.py --keep_candidates` and shown by
score.py's report beside the kept images.

The file is ours but read back (a resumed run keeps the entries of the prompts it skips, the report draws
them): it is checked entry by entry, never trusted as it is.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from libs.files import save_json
from libs.errors import UserError
from libs.prompts import image_name

CANDIDATES_DIR = "candidates"
CANDIDATES_FILE = "candidates.json"
FORMAT = 1


class CandidatesFileError(UserError):
    """candidates.json cannot be read or is not what sample.py writes."""


@dataclass(frozen=True)
class Candidate:
    """One rendered candidate of a prompt and how the metric judged it."""

    prompt_index: int
    candidate: int  # k = slot + round * n_samples: the noise index, keyed_generator(seed, prompt_index, k)
    noise_key: tuple[int, int, int]  # (seed, prompt_index, candidate)
    face_found: bool
    face: float
    clip_img: float
    clip_text: float
    objective: float
    kept_as: str | None  # the kept image's file name ({prompt}-{idx:03}.jpg), None when not kept

    @property
    def file(self) -> str:
        """Its file name in the candidates/ folder."""
        return image_name(self.prompt_index, self.candidate)

    @property
    def kept(self) -> bool:
        return self.kept_as is not None


_TYPES = {"prompt_index": int, "candidate": int, "face_found": bool, "face": float, "clip_img": float,
          "clip_text": float, "objective": float}


@dataclass
class CandidateRecord:
    """candidates.json: the best-of-N settings of the run and every candidate of the prompts it rendered."""

    settings: dict[str, Any]  # candidates, n_samples, seed, objective, face_backend, reference_dir
    candidates: list[Candidate]

    def of_prompt(self, index: int) -> list[Candidate]:
        return [c for c in self.candidates if c.prompt_index == index]

    def replace_prompt(self, index: int, entries: list[Candidate]) -> None:
        """The prompt's entries become `entries` (a redone prompt's old candidates go)."""
        self.candidates = [c for c in self.candidates if c.prompt_index != index] + entries
        self.candidates.sort(key=lambda c: (c.prompt_index, c.candidate))

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "settings": self.settings,
                "candidates": [{**asdict(c), "noise_key": list(c.noise_key), "file": f"{CANDIDATES_DIR}/{c.file}",
                                "kept": c.kept} for c in self.candidates]}

    def save(self, output_path: Path) -> None:
        save_json(self.to_dict(), Path(output_path) / CANDIDATES_FILE)


def load_record(output_path: str | Path) -> CandidateRecord | None:
    """`<output_path>/candidates.json`, checked; None when there is none. A broken file is a CandidatesFileError."""
    path = Path(output_path) / CANDIDATES_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CandidatesFileError(f"{path} is not readable JSON: {error}") from error
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("settings"), dict) \
            or not isinstance(data.get("candidates"), list):
        raise CandidatesFileError(f"{path} is not a format-{FORMAT} candidates record written by sample.py")
    return CandidateRecord(data["settings"], [_entry(item, path) for item in data["candidates"]])


def _entry(item: Any, path: Path) -> Candidate:
    problem = f"{path}: a candidate entry is malformed ({str(item)[:120]})"
    if not isinstance(item, dict):
        raise CandidatesFileError(problem)
    values = {}
    for key, kind in _TYPES.items():
        value = item.get(key)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 0)):
            raise CandidatesFileError(problem)
        values[key] = value
    key, kept_as = item.get("noise_key"), item.get("kept_as")
    if not (isinstance(key, list) and len(key) == 3 and all(isinstance(k, int) for k in key)) \
            or not (kept_as is None or isinstance(kept_as, str)):
        raise CandidatesFileError(problem)
    return Candidate(noise_key=tuple(key), kept_as=kept_as, **values)
