"""The one reader sample.py and the submission tool use: it picks our format or the reference entry's by
what the folder holds, and says what a folder without either holds."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from libs.files import CheckpointError
from libs.models.clip import CLIPTextEncoder
from libs.personalization.folder import NotAPersonalization, Personalization
from libs.personalization.ours import check_ours, load_ours
from libs.personalization.reference_entry import is_reference_entry, load_reference_entry
from libs.train_output import META_FILE, checkpoint_step, list_checkpoints


def folder_contents(restore_path: Path) -> str:
    """What a folder without a personalization holds, in words, with what to do about it."""
    checkpoints = list_checkpoints(restore_path)
    if checkpoints:
        step = checkpoint_step(checkpoints[-1])
        return (f"an unfinished training run at step {step} (checkpoints, no {META_FILE}): resume it with "
                f"`train.py -d <photos> -o {restore_path} --resume latest`")
    entries = sorted(p.name for p in restore_path.iterdir() if not p.name.startswith("."))
    if not entries:
        return "nothing (an empty folder): is the path right? train.py -o writes the personalization there"
    shown = ", ".join(entries[:6]) + (" ..." if len(entries) > 6 else "")
    return f"no {META_FILE} and no reference-entry files (it holds: {shown})"


def check_restore_path(restore_path: str | Path) -> None:
    """Everything about a restore folder that can be checked without models: it holds a personalization
    (ours with a valid personalization.json and its files, or the reference entry's), else the error says
    what it holds. Lets a multi-run sampling session fail before it loads anything."""
    restore_path = Path(restore_path)
    if not restore_path.is_dir():
        raise CheckpointError(f"restore path {restore_path} is not a folder; pass the -o folder of train.py")
    if (restore_path / META_FILE).is_file():
        check_ours(restore_path)
    elif not is_reference_entry(restore_path):
        raise NotAPersonalization(f"{restore_path} holds {folder_contents(restore_path)}; "
                                  "to sample the plain base model on purpose, pass --base_model")


def load_personalization(restore_path: str | Path, nnet: nn.Module, text_encoder: CLIPTextEncoder) -> Personalization:
    """Apply the personalization stored in `restore_path` onto fresh base models (unmerged).

    A folder without one is an error that says what the folder holds: sampling the plain base model by
    accident would silently submit no identity at all."""
    restore_path = Path(restore_path)
    check_restore_path(restore_path)
    if (restore_path / META_FILE).is_file():
        return load_ours(restore_path, nnet, text_encoder)
    return load_reference_entry(restore_path, nnet, text_encoder)
