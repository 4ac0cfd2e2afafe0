"""The competition's subjects and the rule that names their class word (spec §1, §3)."""
from __future__ import annotations

from pathlib import Path

SUBJECTS = ("boy1", "boy2", "girl1", "girl2")
"""In the order train.sh and sample.sh run them."""
CLASS_WORDS = ("boy", "girl")
ADVANCED_SPLITS = ("sim", "edit")
"""The advanced evaluation's prompt files: eval_prompts_advance/<name>_sim.json and <name>_edit.json."""


def class_word_from_path(path: str | Path) -> str:
    """The competition rule: "boy" if the data path contains "boy", else "girl"."""
    text = f"{path} {Path(path).resolve().name}".lower()
    return "boy" if "boy" in text else "girl"

