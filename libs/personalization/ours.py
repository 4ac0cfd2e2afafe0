"""Our personalization format: what train.py writes to `model_output/<name>/` and sample.py puts back
onto the base models (the file names are libs/train_output.py's).

    personalization.json            what was trained (token, init, adapter settings, base hash, recipe)
    uvit_lora.safetensors           U-ViT LoRA weights (peft state dict, adapter name stripped)
    uvit_adapter.safetensors        instead, the U-ViT weights of another adapter family (libs/adapters/families.py;
                                    `uvit_adapter` in personalization.json names it, format version 2)
    token_embeddings.safetensors    {"<new1>": [num_vectors, 768]}
    text_encoder_lora.safetensors   only with text_encoder_mode "lora"
    text_encoder.safetensors        only with text_encoder_mode "full"

Our format: writing it (`save_personalization`), checking it (`read_meta`, `check_ours`) and applying it
(`load_ours`); libs/personalization/reader.py picks between it and the reference entry's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from libs.config import KEY_CHOICES
from libs.files import CheckpointError, load_json, load_safetensors, save_json, save_safetensors
from libs.adapters.families import FAMILIES, AdapterSpec, add_adapter, load_adapter_state
from libs.adapters.lora import LoraSpec, add_lora, load_lora_state, lora_state_dict, require_targets
from libs.models.clip import CLIPTextEncoder
from libs.personalization.folder import Personalization, add_token
from libs.train_output import META_FILE, TEXT_FULL_FILE, TEXT_LORA_FILE, TOKEN_FILE, UVIT_ADAPTER_FILE, UVIT_LORA_FILE

FORMAT = "unidiffuser-personalization"
FORMAT_VERSION = 2  # the newest this toolkit reads; a folder records the oldest that reads it (1 unless uvit_adapter)
TEXT_ENCODER_MODES = KEY_CHOICES["train.text_encoder_mode"]


def save_personalization(out_dir: str | Path, meta: Mapping[str, Any], nnet: nn.Module | None,
                         text_encoder: CLIPTextEncoder | None) -> list[Path]:
    """Write only the trained extras (atomically) and the JSON describing them; returns the files."""
    out_dir = Path(out_dir)
    meta = {"format": FORMAT, "version": 2 if meta.get("uvit_adapter") else 1, **meta}
    mode = meta.get("text_encoder_mode", "frozen")
    if mode not in TEXT_ENCODER_MODES:
        raise ValueError(f"text_encoder_mode {mode!r} not in {TEXT_ENCODER_MODES}")
    files: dict[str, Any] = {}
    if meta.get("uvit_lora"):
        files[UVIT_LORA_FILE] = lora_state_dict(nnet)
    if meta.get("uvit_adapter"):
        files[UVIT_ADAPTER_FILE] = lora_state_dict(nnet)  # peft's state dict of whichever family is injected
    if text_encoder is not None and text_encoder.modifier_token:
        files[TOKEN_FILE] = {text_encoder.modifier_token: text_encoder.new_token_rows()}
    if mode == "lora":
        files[TEXT_LORA_FILE] = lora_state_dict(text_encoder.transformer)
    elif mode == "full":
        files[TEXT_FULL_FILE] = {k: v for k, v in text_encoder.transformer.state_dict().items()
                                 if not k.endswith("extra_weight")}
    written = []
    try:
        for name, tensors in files.items():
            save_safetensors(tensors, out_dir / name)
            written.append(out_dir / name)
        save_json(meta, out_dir / META_FILE)  # last: a folder with personalization.json is complete
    except OSError as error:
        for path in written:
            path.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write the personalization into {out_dir}: {error.strerror or error}; "
                              "none of its files were kept; free space, then rerun the same command with "
                              "--resume latest (it continues from the last checkpoint)") from error
    return [*written, out_dir / META_FILE]


def read_meta(restore_path: Path) -> dict[str, Any]:
    """personalization.json, checked against its schema so a damaged file is named, not a KeyError."""
    path = restore_path / META_FILE  # read by files.load_json like a checkpoint's state; the schema check is this file's
    meta = load_json(path, lambda error: CheckpointError(f"cannot read {path}: {error}; retrain into this folder "
                                                         "(train.py --overwrite)"))
    problems = meta_problems(meta)
    if problems:
        raise CheckpointError(f"{path} is damaged or not written by train.py: {'; '.join(problems)}; "
                              "retrain into this folder (train.py --overwrite)")
    return meta


def _is_lora_spec(value: Any) -> bool:
    return (isinstance(value, dict) and isinstance(value.get("r"), int) and value["r"] >= 1
            and isinstance(value.get("alpha"), (int, float)) and isinstance(value.get("target_modules"), list)
            and all(isinstance(m, str) for m in value["target_modules"]))


def meta_problems(meta: Any) -> list[str]:
    """What is wrong with a parsed personalization.json (empty when it can be used)."""
    if not isinstance(meta, dict):
        return [f"it holds a JSON {type(meta).__name__}, not an object"]
    if meta.get("format") != FORMAT:
        return [f"format is {meta.get('format')!r}, not {FORMAT!r}"]
    version = meta.get("version")
    if not isinstance(version, int):
        return [f"version {version!r} is not an integer"]
    if version > FORMAT_VERSION:
        return [f"version {version} is newer than this toolkit reads ({FORMAT_VERSION}): update the toolkit"]
    problems = []
    for key in ("modifier_token", "class_word"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            problems.append(f"{key} must be a string or null")
    mode = meta.get("text_encoder_mode", "frozen")
    if mode not in TEXT_ENCODER_MODES:
        problems.append(f"text_encoder_mode {mode!r} is not one of {', '.join(TEXT_ENCODER_MODES)}")
    if meta.get("uvit_lora") is not None and not _is_lora_spec(meta["uvit_lora"]):
        problems.append("uvit_lora must hold r (>= 1), alpha and target_modules")
    if meta.get("uvit_adapter") is not None:
        problems.extend(_adapter_problems(meta["uvit_adapter"]))
        if meta.get("uvit_lora") is not None:
            problems.append("uvit_lora and uvit_adapter exclude each other (one adapter family per U-ViT)")
    if mode == "lora" and not _is_lora_spec(meta.get("text_lora")):
        problems.append("text_encoder_mode lora needs text_lora with r (>= 1), alpha and target_modules")
    return problems


def adapter_meta(spec: AdapterSpec | None) -> dict[str, Any]:
    """personalization.json's entry for the U-ViT adapter: `uvit_lora` as ever for LoRA (a LoRA folder is
    unchanged and older toolkits read it), `uvit_adapter` naming the family for the others, none without one."""
    if spec is None:
        return {}
    return {"uvit_lora": spec.to_dict()} if spec.family == "lora" else {"uvit_adapter": spec.to_dict()}


def _adapter_problems(value: Any) -> list[str]:
    if not isinstance(value, dict) or value.get("family") not in FAMILIES[1:]:
        return [f"uvit_adapter must name its family, one of {', '.join(FAMILIES[1:])}"]
    sizes = {"oft": ("block_size",), "vera": ("r",)}.get(value["family"], ("r", "alpha"))
    if any(not isinstance(value.get(key), (int, float)) or value[key] <= 0 for key in sizes):
        return [f"uvit_adapter ({value['family']}) must hold {' and '.join(sizes)} (> 0)"]
    if not isinstance(value.get("target_modules"), list) or not all(isinstance(m, str) for m in value["target_modules"]):
        return ["uvit_adapter must hold target_modules, a list of module names"]
    return []


def check_ours(restore_path: Path) -> None:
    """A valid personalization.json and every file it lists, checked without models."""
    meta = read_meta(restore_path)
    needed = [TOKEN_FILE] if meta.get("modifier_token") else []
    needed += [UVIT_LORA_FILE] if meta.get("uvit_lora") else []
    needed += [UVIT_ADAPTER_FILE] if meta.get("uvit_adapter") else []
    needed += {"lora": [TEXT_LORA_FILE], "full": [TEXT_FULL_FILE]}.get(meta.get("text_encoder_mode", "frozen"), [])
    absent = [name for name in needed if not (restore_path / name).is_file()]
    if absent:
        raise CheckpointError(f"{restore_path} is incomplete: {META_FILE} lists {', '.join(absent)}, which "
                              "is missing; retrain into this folder (train.py --overwrite)")


def load_ours(restore_path: Path, nnet: nn.Module, text_encoder: CLIPTextEncoder) -> Personalization:
    """Apply our format onto fresh base models (unmerged); `check_ours` has passed."""
    meta = read_meta(restore_path)
    token = meta.get("modifier_token")
    if token:
        rows = load_safetensors(restore_path / TOKEN_FILE, "token embeddings")
        if token not in rows:
            raise CheckpointError(f"{restore_path / TOKEN_FILE} has no row for {token!r} (found {sorted(rows)})")
        vectors = rows[token]
        if vectors.ndim != 2 or vectors.shape[1] != text_encoder.hidden_size:
            raise CheckpointError(f"{restore_path / TOKEN_FILE}: {token} has shape {tuple(vectors.shape)}, "
                                  f"the text encoder needs [n, {text_encoder.hidden_size}]")
        if not torch.isfinite(vectors).all():
            raise CheckpointError(f"{restore_path / TOKEN_FILE}: the rows of {token} hold NaN or inf values")
        add_token(text_encoder, token, vectors, restore_path / TOKEN_FILE)
    mode = meta.get("text_encoder_mode", "frozen")
    if mode == "lora":
        spec = LoraSpec.from_dict(meta["text_lora"])
        add_lora(text_encoder.transformer, spec, for_loading=True)
        load_lora_state(text_encoder.transformer, load_safetensors(restore_path / TEXT_LORA_FILE, "text-encoder LoRA"),
                        restore_path / TEXT_LORA_FILE, assign=True)
    elif mode == "full":
        state = load_safetensors(restore_path / TEXT_FULL_FILE, "text-encoder weights")
        own = {k for k in text_encoder.transformer.state_dict() if not k.endswith("extra_weight")}
        if set(state) != own:
            raise CheckpointError(f"{restore_path / TEXT_FULL_FILE} does not match the text encoder's parameters")
        text_encoder.transformer.load_state_dict(state, strict=False, assign=True)  # never into shared base storage
    if meta.get("uvit_lora"):
        spec = LoraSpec.from_dict(meta["uvit_lora"])
        require_targets(nnet, spec, restore_path / META_FILE)
        add_lora(nnet, spec, for_loading=True)
        load_lora_state(nnet, load_safetensors(restore_path / UVIT_LORA_FILE, "U-ViT LoRA"), restore_path / UVIT_LORA_FILE,
                        assign=True)
    if meta.get("uvit_adapter"):
        adapter = AdapterSpec.from_dict(meta["uvit_adapter"])
        require_targets(nnet, adapter, restore_path / META_FILE)
        add_adapter(nnet, adapter, for_loading=True)
        load_adapter_state(nnet, load_safetensors(restore_path / UVIT_ADAPTER_FILE, f"U-ViT {adapter.family} adapter"),
                           restore_path / UVIT_ADAPTER_FILE)
    nnet.eval()  # freshly injected LoRA dropout layers start in training mode
    text_encoder.eval()
    return Personalization(kind="ours", path=restore_path, meta=meta, modifier_token=token, class_word=meta.get("class_word"))
