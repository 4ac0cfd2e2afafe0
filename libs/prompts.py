"""The competition's prompt files and output names, shared by sample.py and score.py."""
from __future__ import annotations

import json
from pathlib import Path


def load_prompts(path: str | Path, error: type[Exception] = ValueError) -> list[str]:
    """A prompt file is a non-empty JSON list of strings; the prompt index is the list position.

    Problems raise `error` (each caller's own input-error class) with the file named."""
    path = Path(path)
    if not path.is_file():
        raise error(f"prompt file not found: {path}")
    try:
        prompts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as problem:
        raise error(f"prompt file {path} is not valid JSON: {problem}") from problem
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise error(f"prompt file {path} must hold a JSON list of strings")
    if not prompts:
        raise error(f"prompt file {path} holds no prompts")
    return prompts


def image_name(prompt_index: int, sample_index: int) -> str:
    """`{prompt_index}-{idx:03}.jpg`, the name the grader reads."""
    return f"{prompt_index}-{sample_index:03}.jpg"
