"""The competition's prompt files and output names, and the prompt rewriting around the trained token."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from libs.errors import UserError
from libs.files import load_json
from libs.layout import CLASS_WORDS


class PromptFileError(UserError):
    """A prompt file is missing or is not a non-empty JSON list of strings."""


def load_prompts(path: str | Path) -> list[str]:
    """A prompt file is a non-empty JSON list of strings; the prompt index is the list position."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file not found: {path}")
    prompts = load_json(path, lambda problem: PromptFileError(f"prompt file {path} is not valid JSON: {problem}"))
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise PromptFileError(f"prompt file {path} must hold a JSON list of strings")
    if not prompts:
        raise PromptFileError(f"prompt file {path} holds no prompts")
    return prompts


def image_name(prompt_index: int, sample_index: int) -> str:
    """`{prompt_index}-{idx:03}.jpg`, the name the grader reads."""
    return f"{prompt_index}-{sample_index:03}.jpg"


def fill_prompt(template: str, token: str | None, class_word: str) -> str:
    """Fill {token} and {class_word}; without a token its placeholder (and the space it leaves) goes."""
    text = template.replace("{class_word}", class_word).replace("{token}", token or "")
    return " ".join(text.split())


def rewrite_prompt(prompt: str, token: str | None, class_words: Sequence[str] = CLASS_WORDS) -> str:
    """"a boy in the wild" -> "a <new1> boy in the wild": the trained token goes before each whole class word."""
    if not token or not class_words:
        return prompt
    words = "|".join(re.escape(w) for w in class_words)
    return re.sub(rf"(?<!{re.escape(token)} )\b({words})\b", rf"{token} \1", prompt, flags=re.IGNORECASE)
