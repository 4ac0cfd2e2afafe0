"""Tiny stand-ins for what a submission holds beside the code, for checks that cannot have the real ones offline:
trained-looking personalizations of the four subjects in our folder format, and a face-model pack in insightface
buffalo_l's file layout and ONNX signatures, so that insightface's own loading, detection, alignment and
recognition code runs on it (the real pack cannot be downloaded here).

Used by the tests and by tools/image_check.py (the submission image replayed in a clean root).
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import ml_collections
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from libs.adapters.lora import LoraSpec, add_lora, uvit_lora_modules
from libs.config import load_config
from libs.layout import SUBJECTS
from libs.models.loading import load_text_encoder, load_uvit
from libs.personalization import save_personalization

TINY_KPS = (0.3, 0.35, 0.7, 0.35, 0.5, 0.55, 0.35, 0.75, 0.65, 0.75)  # 5 landmarks inside a 32x32 cell


class TinyDetector(torch.nn.Module):
    """SCRFD's output layout (strides 8/16/32, 2 anchors, boxes and 5 keypoints); fires only on stride-32
    cells that are pure green, with the box exactly covering the cell."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        green = x[:, 1:2]  # insightface feeds (pixel - 127.5) / 128 in RGB order
        scores, boxes, kps = [], [], []
        for stride in (8, 16, 32):
            pooled = F.avg_pool2d(green, stride, stride)
            logit = 40 * (pooled - 0.9) if stride == 32 else pooled * 0 - 20
            per_anchor = torch.cat([logit.reshape(-1, 1)] * 2, dim=1).reshape(-1, 1)
            ones = per_anchor * 0 + 1
            scores.append(torch.sigmoid(per_anchor))
            boxes.append(torch.cat([ones * 0, ones * 0, ones, ones], dim=1))  # distances in stride units
            kps.append(ones * torch.tensor(TINY_KPS))
        return tuple(scores + boxes + kps)


class TinyRecognizer(torch.nn.Module):
    """ArcFace's interface (112x112 aligned crop -> embedding): a 4x4 pooling of the red and blue channels,
    centred, so mirror-image patterns give a negative cosine."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(x[:, [0, 2]], 4).flatten(1)
        return pooled - pooled.mean(dim=1, keepdim=True)


def write_tiny_insightface_pack(root: Path, model_name: str = "buffalo_l") -> Path:
    """`root/models/<model_name>/{det,rec}_tiny.onnx`, which `FaceAnalysis(name, root)` loads as a pack."""
    folder = root / "models" / model_name
    folder.mkdir(parents=True, exist_ok=True)
    outputs = [f"{kind}_{stride}" for kind in ("score", "bbox", "kps") for stride in (8, 16, 32)]
    with warnings.catch_warnings():  # the legacy exporter's deprecation notes
        warnings.simplefilter("ignore")
        torch.onnx.export(TinyDetector(), torch.zeros(1, 3, 64, 64), str(folder / "det_tiny.onnx"), input_names=["input.1"],
                          output_names=outputs, dynamic_axes={"input.1": {2: "height", 3: "width"}}, dynamo=False)
        torch.onnx.export(TinyRecognizer(), torch.zeros(1, 3, 112, 112), str(folder / "rec_tiny.onnx"),
                          input_names=["input.1"], output_names=["embedding"],
                          dynamic_axes={"input.1": {0: "batch"}, "embedding": {0: "batch"}}, dynamo=False)
    return folder


def synthetic_face(red_side: str, size: int = 640, at: int = 320) -> np.ndarray:
    """A black image with one 32x32 green "face" (what TinyDetector finds) whose left or right half is red:
    the two variants are mirror images, so TinyRecognizer gives them a negative cosine."""
    image = np.zeros((size, size, 3), np.uint8)
    image[at:at + 32, at:at + 32, 1] = 255
    columns = slice(at, at + 16) if red_side == "left" else slice(at + 16, at + 32)
    image[at:at + 32, columns, 0] = 255
    return image


def tiny_world_config(tiny_world: Path) -> ml_collections.ConfigDict:
    """The tiny config with its weight paths pointing at the tiny world in `tiny_world`."""
    config = load_config("tiny")
    config.paths.nnet = str(tiny_world / "uvit_v1.pth")
    config.paths.autoencoder = str(tiny_world / "autoencoder_kl.pth")
    config.paths.caption_decoder = str(tiny_world / "caption_decoder.pth")
    config.paths.clip_text = str(tiny_world / "clip-vit-large-patch14")
    config.paths.clip_img = str(tiny_world / "clip-vit-base-patch32")
    return config


def write_grader_config(path: Path) -> Path:
    """A config file for the tiny world laid out as the organizers mount it: UniDiffuser's files in models/, the
    CLIP folders found where the image bakes them."""
    path.write_text("from libs.config import load_config\n\n\ndef get_config():\n    config = load_config('tiny')\n"
                    "    for key in ('nnet', 'autoencoder', 'caption_decoder', 'clip_text', 'clip_img'):\n"
                    "        config.paths[key] = 'models/' + config.paths[key].rsplit('/', 1)[-1]\n"
                    "    return config\n")
    return path


def write_grader_mounts(tiny_world: Path, folder: Path, photos: list[Image.Image]) -> Path:
    """What the organizers mount, on the tiny world: models/ (UniDiffuser's three files, nothing else),
    train_data/<subject>/ (`photos`) and eval_prompts_advance/<subject>_{sim,edit}.json (one prompt each)."""
    (folder / "models").mkdir(parents=True)
    for name in ("uvit_v1.pth", "autoencoder_kl.pth", "caption_decoder.pth"):
        shutil.copy(tiny_world / name, folder / "models" / name)
    prompts = folder / "eval_prompts_advance"
    prompts.mkdir()
    for name in SUBJECTS:
        word = "boy" if name.startswith("boy") else "girl"
        (prompts / f"{name}_sim.json").write_text(json.dumps([f"a photo of a {word}"]))
        (prompts / f"{name}_edit.json").write_text(json.dumps([f"a {word} on the beach"]))
        subject = folder / "train_data" / name
        subject.mkdir(parents=True)
        for number, photo in enumerate(photos):
            photo.save(subject / f"{number}.{'jpeg' if number % 2 else 'jpg'}", quality=95)
    return folder


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
