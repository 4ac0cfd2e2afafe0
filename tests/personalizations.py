"""Tiny trained-looking personalizations in our folder format, for tests that need model_output/<name>."""
from __future__ import annotations

from pathlib import Path

import ml_collections
import torch

from libs.adapters.lora import LoraSpec, add_lora, uvit_lora_modules
from libs.models.loading import load_text_encoder, load_uvit
from libs.personalization import save_personalization
from libs.layout import SUBJECTS


def write_personalization(config: ml_collections.ConfigDict, folder: Path, rank: int, class_word: str,
                          seed: int) -> None:
    """U-ViT LoRA of `rank` with random (non-zero) B and a `<new1>` token row; the rank sets its parameter count."""
    nnet, text_encoder = load_uvit(config), load_text_encoder(config)
    spec = LoraSpec(r=rank, alpha=float(rank), target_modules=uvit_lora_modules(nnet))
    add_lora(nnet, spec)
    generator = torch.Generator().manual_seed(seed)
    for name, param in nnet.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.3
    text_encoder.add_modifier_token("<new1>", class_word)
    save_personalization(folder, {"modifier_token": "<new1>", "class_word": class_word, "text_encoder_mode": "token",
                                  "uvit_lora": spec.to_dict()}, nnet, text_encoder)


def write_subjects(config: ml_collections.ConfigDict, root: Path) -> dict[str, Path]:
    """One personalization per competition subject under `root`, each of another rank (so each count differs)."""
    folders = {}
    for rank, name in enumerate(SUBJECTS, start=1):
        folders[name] = root / name
        write_personalization(config, folders[name], rank, "boy" if name.startswith("boy") else "girl", seed=rank)
    return folders
