"""The official weights: where each lives (from the config), fetching what is missing (tools/download.py)
and the check every entry script runs first, so a missing file is reported at start, by name, with the
command that fetches it — not as a stack trace deep inside a loader.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from libs.files import CheckpointError, DOWNLOAD_HINT
from libs.config import REPO_ROOT, extra_models_dir
from libs.outputs import check_output_folder

UNIDIFFUSER_REPO = "thu-ml/unidiffuser-v1"
# files of the Hugging Face model folders that transformers needs (no TF/Flax/.bin duplicates)
HF_FOLDER_PATTERNS = ["*.json", "*.txt", "model.safetensors"]
# what each entry script needs (checked at its start)
SAMPLING_WEIGHTS = ("nnet", "autoencoder", "caption_decoder", "clip_text")
TRAINING_WEIGHTS = (*SAMPLING_WEIGHTS, "clip_img")
WEIGHT_KEYS = TRAINING_WEIGHTS


def folder_candidates(local: str | Path) -> list[Path]:
    """Where a Hugging Face model folder may be, in order: the config's path, then the folder of the same name
    under $UNIDIFFUSER_EXTRA_MODELS (the submission image bakes the models the organizers do not mount there)."""
    if not str(local):
        return []
    extra = extra_models_dir()
    return [Path(local)] + ([extra / Path(local).name] if extra is not None else [])


def local_model_folder(local: str | Path) -> Path | None:
    """The first candidate folder that holds a model (a config.json), None when none does."""
    return next((folder for folder in folder_candidates(local) if (folder / "config.json").is_file()), None)


def resolve_pretrained(local: str, hub_id: str, what: str) -> str:
    """Where a Hugging Face model is loaded from: a local folder (see `folder_candidates`), else the hub id
    (downloaded, or found in the hub cache when HF_HUB_OFFLINE=1)."""
    folder = local_model_folder(local)
    if folder is not None:
        return str(folder)
    if hub_id:
        return hub_id
    looked = " or ".join(str(folder) for folder in folder_candidates(local)) or "no local folder configured"
    raise CheckpointError(f"{what} not found: no config.json in {looked}\n  -> {DOWNLOAD_HINT}")


@dataclass
class WeightItem:
    """One thing in models/: a single checkpoint file or a Hugging Face model folder."""

    key: str  # the config.paths key
    path: Path
    repo_id: str
    filename: str | None  # None: a whole model folder

    @property
    def present(self) -> bool:
        return local_model_folder(self.path) is not None if self.filename is None else self.path.is_file()


def weight_items(config) -> list[WeightItem]:
    paths = config.paths
    return [
        WeightItem("nnet", Path(paths.nnet), UNIDIFFUSER_REPO, "uvit_v1.pth"),
        WeightItem("autoencoder", Path(paths.autoencoder), UNIDIFFUSER_REPO, "autoencoder_kl.pth"),
        WeightItem("caption_decoder", Path(paths.caption_decoder), UNIDIFFUSER_REPO, "caption_decoder.pth"),
        WeightItem("clip_text", Path(paths.clip_text), paths.clip_text_hub, None),
        WeightItem("clip_img", Path(paths.clip_img), paths.clip_img_hub, None),
    ]


def ensure_weights(config, needed: Sequence[str]) -> None:
    """Raise one clear error listing every needed weight that is missing.

    A CLIP folder that is absent locally is fine when the config names a hub id (transformers will
    fetch or use its cache); the three UniDiffuser checkpoints must be files in models/.
    """
    missing = [item for item in weight_items(config) if item.key in needed and not item.present
               and not (item.filename is None and item.repo_id)]
    if missing:
        listing = "\n".join(f"  - {item.path}" for item in missing)
        raise CheckpointError(f"missing model weights:\n{listing}\n  -> {DOWNLOAD_HINT}")


def _hf_file(item: WeightItem) -> None:
    from huggingface_hub import hf_hub_download

    hf_hub_download(repo_id=item.repo_id, filename=item.filename, local_dir=item.path.parent)
    fetched = item.path.parent / item.filename
    if fetched != item.path:
        fetched.replace(item.path)


def _hf_folder(item: WeightItem) -> None:
    from huggingface_hub import snapshot_download

    snapshot_download(repo_id=item.repo_id, local_dir=item.path, allow_patterns=HF_FOLDER_PATTERNS)


def download_weights(config, only: Sequence[str] | None = None,
                     fetch_file: Callable[[WeightItem], None] = _hf_file,
                     fetch_folder: Callable[[WeightItem], None] = _hf_folder,
                     log: Callable[[str], None] = print) -> list[WeightItem]:
    """Download what is missing; returns the items fetched. Present items are skipped and reported."""
    fetched = []
    for item in weight_items(config):
        if only and item.key not in only:
            continue
        if item.present:
            log(f"present   {item.path}")
            continue
        check_output_folder(item.path.parent, f"the folder of {item.path.name} (config paths.{item.key})")
        if not item.repo_id:
            raise CheckpointError(f"{item.path} is missing and config {config.name!r} names no hub repository for it")
        source = f"{item.repo_id}/{item.filename}" if item.filename else item.repo_id
        log(f"fetching  {source} -> {item.path}")
        (fetch_file if item.filename else fetch_folder)(item)
        if not item.present:
            raise CheckpointError(f"download of {source} finished but {item.path} is still missing")
        fetched.append(item)
    log(f"done: {len(fetched)} fetched, models in {REPO_ROOT / 'models'}")
    return fetched
