"""The personalization: what train.py writes to `model_output/<name>/` and sample.py puts back onto the
base models — peft LoRA on the U-ViT (and optionally the CLIP text encoder), the `<new1>` token rows,
a JSON saying what was trained — and the changed-parameter count of spec §7.

Layout of a personalization folder:
    personalization.json            what was trained (token, init, LoRA settings, base hash, recipe)
    uvit_lora.safetensors           U-ViT LoRA weights (peft state dict, adapter name stripped)
    token_embeddings.safetensors    {"<new1>": [num_vectors, 768]}
    text_encoder_lora.safetensors   only with text_encoder_mode "lora"
    text_encoder.safetensors        only with text_encoder_mode "full"

sample.py also reads the reference entry's output folder (kind "reference_entry"):
    <new1>.bin                      torch pickle {"<new1>": [768]}
    lora.pt (or lora.pt.tmp)        peft state dict, `base_model.model.<module>.lora_A.default.weight`
    adapter_config.json             optional; its `lora_alpha` replaces the entry's alpha of 32
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import nn

from libs.checkpoint import CheckpointError, load_safetensors, load_torch_state_dict, save_json, save_safetensors
from libs.clip import CLIPTextEncoder, original_text_encoder_state
from libs.config import resolve_path

FORMAT = "unidiffuser-personalization"
FORMAT_VERSION = 1
META_FILE = "personalization.json"
UVIT_LORA_FILE = "uvit_lora.safetensors"
TOKEN_FILE = "token_embeddings.safetensors"
TEXT_LORA_FILE = "text_encoder_lora.safetensors"
TEXT_FULL_FILE = "text_encoder.safetensors"

TEXT_ENCODER_MODES = ("frozen", "token", "lora", "full")
BLOCK_TARGETS = ("qkv", "proj", "fc1", "fc2", "skip_linear")
BLOCK_TARGET_PATHS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2", "skip_linear": "skip_linear"}
TOP_LEVEL_TARGETS = ("text_embed", "clip_img_embed", "text_out", "clip_img_out", "decoder_pred", "patch_embed.proj")
DEFAULT_UVIT_TARGETS = ("qkv", "proj", "fc1", "fc2", "text_embed", "clip_img_embed")
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")

REFERENCE_LORA_FILES = ("lora.pt", "lora.pt.tmp")  # the entry renamed .tmp only after a clean finish
REFERENCE_ADAPTER_CONFIG = "adapter_config.json"
REFERENCE_LORA_ALPHA = 32.0
REFERENCE_LORA_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<part>[AB])(?:\.(?P<adapter>[^.]+))?\.weight")


def uvit_lora_modules(nnet: nn.Module, targets: Sequence[str] = DEFAULT_UVIT_TARGETS) -> list[str]:
    """Full module names for LoRA. Block-level names (`qkv`, `proj`, `fc1`, `fc2`, `skip_linear`) only hit
    the transformer blocks; the patch-embedding conv is targeted only when `patch_embed.proj` is asked
    for by name (the reference entry hit it by accident through the bare name `proj`)."""
    unknown = sorted(set(targets) - set(BLOCK_TARGETS) - set(TOP_LEVEL_TARGETS))
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}; choose from {BLOCK_TARGETS + TOP_LEVEL_TARGETS}")
    block_paths = "|".join(re.escape(BLOCK_TARGET_PATHS[t]) for t in targets if t in BLOCK_TARGETS)
    top = [t for t in targets if t in TOP_LEVEL_TARGETS]
    patterns = [re.escape(t) for t in top]
    if block_paths:
        patterns.append(rf"(in_blocks\.\d+|mid_block|out_blocks\.\d+)\.({block_paths})")
    regex = re.compile("|".join(patterns))
    names = [name for name, module in nnet.named_modules() if regex.fullmatch(name) and isinstance(module, (nn.Linear, nn.Conv2d))]
    if not names:
        raise ValueError(f"LoRA targets {list(targets)} match no module")
    return names


def text_lora_modules(text_encoder: CLIPTextEncoder) -> list[str]:
    """Attention projections of every CLIP text layer."""
    return [name for name, module in text_encoder.transformer.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TEXT_LORA_TARGETS]


@dataclass
class LoraSpec:
    """The LoRA settings that are stored in personalization.json and rebuilt at sampling."""

    r: int
    alpha: float
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)

    def peft_config(self) -> LoraConfig:
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=self.target_modules,
                          init_lora_weights=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LoraSpec":
        return cls(r=int(data["r"]), alpha=float(data["alpha"]), dropout=float(data.get("dropout", 0.0)),
                   target_modules=list(data["target_modules"]))

    def to_dict(self) -> dict[str, Any]:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "target_modules": self.target_modules}

    def num_parameters(self, model: nn.Module) -> int:
        """r·(d_in + d_out) per Linear, r·(C_in·k·k + C_out) per Conv2d: what the adapters add."""
        total = 0
        modules = dict(model.named_modules())
        for name in self.target_modules:
            module = modules[name]
            module = getattr(module, "base_layer", module)
            if isinstance(module, nn.Conv2d):
                total += self.r * (module.in_channels * module.kernel_size[0] * module.kernel_size[1] + module.out_channels)
            else:
                total += self.r * (module.in_features + module.out_features)
        return total


def add_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """Inject peft LoRA layers in place (the model keeps its class and forward signature)."""
    return inject_adapter_in_model(spec.peft_config(), model)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return get_peft_model_state_dict(model)


def load_lora_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Load adapter weights; every adapter tensor in the file must exist in the model with the same shape."""
    own = get_peft_model_state_dict(model)
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    mismatched = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if unexpected or missing or mismatched:
        details = "; ".join(f"{title}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
                            for title, items in (("unknown", unexpected), ("missing", missing),
                                                 ("shape mismatch", mismatched)) if items)
        raise CheckpointError(f"{source} does not fit this base model ({details}); "
                              "was it trained with another config, rank or base checkpoint?")
    set_peft_model_state_dict(model, dict(state))


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA delta into its base weight (inference speed); returns the number of merged layers."""
    merged = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and not module.merged:
            module.merge()
            merged += 1
    return merged


# --- the folder format --------------------------------------------------------------------------


@dataclass
class Personalization:
    """What `load_personalization` found and applied."""

    kind: str  # "ours", "reference_entry" or "none"
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    modifier_token: str | None = None
    class_word: str | None = None

    def describe(self) -> str:
        if self.kind == "none":
            return f"no personalization in {self.path}: sampling the plain base model"
        parts = [f"{self.kind} personalization from {self.path}"]
        if self.modifier_token:
            parts.append(f"token {self.modifier_token}")
        if self.meta.get("uvit_lora"):
            lora = self.meta["uvit_lora"]
            parts.append(f"U-ViT LoRA r={lora['r']} alpha={lora['alpha']} on {len(lora['target_modules'])} modules")
        if self.meta.get("text_encoder_mode") in ("lora", "full"):
            parts.append(f"text encoder {self.meta['text_encoder_mode']}")
        return ", ".join(parts)


def save_personalization(out_dir: str | Path, meta: Mapping[str, Any], nnet: nn.Module | None,
                         text_encoder: CLIPTextEncoder | None) -> list[Path]:
    """Write only the trained extras (atomically) and the JSON describing them; returns the files."""
    out_dir = Path(out_dir)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, **meta}
    mode = meta.get("text_encoder_mode", "frozen")
    if mode not in TEXT_ENCODER_MODES:
        raise ValueError(f"text_encoder_mode {mode!r} not in {TEXT_ENCODER_MODES}")
    written = []
    if meta.get("uvit_lora"):
        save_safetensors(lora_state_dict(nnet), out_dir / UVIT_LORA_FILE)
        written.append(out_dir / UVIT_LORA_FILE)
    if text_encoder is not None and text_encoder.modifier_token:
        save_safetensors({text_encoder.modifier_token: text_encoder.new_token_rows()}, out_dir / TOKEN_FILE)
        written.append(out_dir / TOKEN_FILE)
    if mode == "lora":
        save_safetensors(lora_state_dict(text_encoder.transformer), out_dir / TEXT_LORA_FILE)
        written.append(out_dir / TEXT_LORA_FILE)
    elif mode == "full":
        state = {k: v for k, v in text_encoder.transformer.state_dict().items() if not k.endswith("extra_weight")}
        save_safetensors(state, out_dir / TEXT_FULL_FILE)
        written.append(out_dir / TEXT_FULL_FILE)
    save_json(meta, out_dir / META_FILE)
    written.append(out_dir / META_FILE)
    return written


def read_meta(restore_path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((restore_path / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {restore_path / META_FILE}: {error}") from error
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{restore_path / META_FILE} is not a {FORMAT} file (format={meta.get('format')!r})")
    if int(meta.get("version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{restore_path / META_FILE} has version {meta['version']}; this toolkit reads "
                              f"up to {FORMAT_VERSION}: update the toolkit")
    return meta


def load_personalization(restore_path: str | Path, nnet: nn.Module, text_encoder: CLIPTextEncoder) -> Personalization:
    """Apply the personalization stored in `restore_path` onto freshly loaded base models (unmerged)."""
    restore_path = Path(restore_path)
    if not restore_path.is_dir():
        raise CheckpointError(f"restore path {restore_path} is not a folder; pass the -o folder of train.py")
    if (restore_path / META_FILE).is_file():
        return _load_ours(restore_path, nnet, text_encoder)
    if _reference_lora_file(restore_path) or _reference_token_files(restore_path):
        return _load_reference_entry(restore_path, nnet, text_encoder)
    return Personalization(kind="none", path=restore_path)


def _load_ours(restore_path: Path, nnet: nn.Module, text_encoder: CLIPTextEncoder) -> Personalization:
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
        text_encoder.add_modifier_token(token, vectors, num_vectors=vectors.shape[0])
    mode = meta.get("text_encoder_mode", "frozen")
    if mode == "lora":
        spec = LoraSpec.from_dict(meta["text_lora"])
        add_lora(text_encoder.transformer, spec)
        load_lora_state(text_encoder.transformer, load_safetensors(restore_path / TEXT_LORA_FILE, "text-encoder LoRA"),
                        restore_path / TEXT_LORA_FILE)
    elif mode == "full":
        state = load_safetensors(restore_path / TEXT_FULL_FILE, "text-encoder weights")
        own = {k for k in text_encoder.transformer.state_dict() if not k.endswith("extra_weight")}
        if set(state) != own:
            raise CheckpointError(f"{restore_path / TEXT_FULL_FILE} does not match the text encoder's parameters")
        text_encoder.transformer.load_state_dict(state, strict=False)
    if meta.get("uvit_lora"):
        spec = LoraSpec.from_dict(meta["uvit_lora"])
        known = dict(nnet.named_modules())
        absent = [m for m in spec.target_modules if m not in known]
        if absent:
            raise CheckpointError(f"{restore_path / META_FILE} targets modules the U-ViT does not have: {absent[:4]}")
        add_lora(nnet, spec)
        load_lora_state(nnet, load_safetensors(restore_path / UVIT_LORA_FILE, "U-ViT LoRA"), restore_path / UVIT_LORA_FILE)
    nnet.eval()  # freshly injected LoRA dropout layers start in training mode
    text_encoder.eval()
    return Personalization(kind="ours", path=restore_path, meta=meta, modifier_token=token, class_word=meta.get("class_word"))


# --- the reference entry's layout -------------------------------------------------------------------


def _reference_lora_file(restore_path: Path) -> Path | None:
    return next((restore_path / name for name in REFERENCE_LORA_FILES if (restore_path / name).is_file()), None)


def _reference_token_files(restore_path: Path) -> list[Path]:
    return sorted(restore_path.glob("*.bin"))


def _torch_load(path: Path, what: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - re-raised with the file name
        raise CheckpointError(f"cannot read {what} {path}: {error}") from error


def _reference_token(restore_path: Path, hidden_size: int) -> tuple[str, torch.Tensor] | None:
    """The one `{token: vector}` pickle of the entry, as [n, hidden] rows."""
    found: dict[str, tuple[Path, torch.Tensor]] = {}
    for path in _reference_token_files(restore_path):
        data = _torch_load(path, "token embedding")
        if not isinstance(data, Mapping) or not data or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
            raise CheckpointError(f"{path} is not a token embedding file (expected a dict {{token: tensor}})")
        found.update({token: (path, vector) for token, vector in data.items()})
    if not found:
        return None
    if len(found) > 1:
        raise CheckpointError(f"{restore_path} holds {len(found)} token embeddings ({sorted(found)}); one is supported")
    (token, (path, vector)), = found.items()
    if vector.numel() == 0 or vector.numel() % hidden_size:
        raise CheckpointError(f"{path}: {token} has shape {tuple(vector.shape)}, "
                              f"the text encoder needs {hidden_size}-d rows")
    return token, vector.detach().float().reshape(-1, hidden_size)


def _reference_lora(path: Path, restore_path: Path) -> tuple[LoraSpec, dict[str, torch.Tensor]]:
    """Rebuild the LoRA settings from the state dict itself: rank from lora_A, targets from the key names."""
    state = _torch_load(path, "LoRA weights")
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{path} is not a LoRA state dict")
    converted: dict[str, torch.Tensor] = {}
    adapters, unknown = set(), []
    for key, value in state.items():
        match = REFERENCE_LORA_KEY.fullmatch(key) if isinstance(key, str) else None
        if match is None or not isinstance(value, torch.Tensor):
            unknown.append(str(key))
            continue
        adapters.add(match["adapter"])
        converted[f"{match['module']}.lora_{match['part']}.weight"] = value
    if unknown:
        raise CheckpointError(f"{path} holds tensors that are not LoRA weights: {', '.join(unknown[:4])}"
                              f"{' ...' if len(unknown) > 4 else ''}")
    if len(adapters) > 1:
        raise CheckpointError(f"{path} mixes several adapters ({sorted(map(str, adapters))}); one is supported")
    modules = sorted({key.rsplit(".lora_", 1)[0] for key in converted})
    halves = [m for m in modules if f"{m}.lora_A.weight" not in converted or f"{m}.lora_B.weight" not in converted]
    if halves:
        raise CheckpointError(f"{path}: LoRA of {', '.join(halves[:4])} lacks its lora_A or lora_B weight")
    ranks = {converted[f"{m}.lora_A.weight"].shape[0] for m in modules}
    if len(ranks) != 1:
        raise CheckpointError(f"{path}: lora_A weights have different ranks {sorted(ranks)}; one rank is supported")
    alpha = REFERENCE_LORA_ALPHA
    config_file = restore_path / REFERENCE_ADAPTER_CONFIG
    if config_file.is_file():
        try:
            alpha = float(json.loads(config_file.read_text())["lora_alpha"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"cannot read lora_alpha from {config_file}: {error}") from error
    return LoraSpec(r=ranks.pop(), alpha=alpha, target_modules=modules), converted


def _load_reference_entry(restore_path: Path, nnet: nn.Module, text_encoder: CLIPTextEncoder) -> Personalization:
    """The reference entry's `<new1>.bin` + `lora.pt(.tmp)`, applied like our own format (unmerged)."""
    meta: dict[str, Any] = {"source_files": []}
    token = _reference_token(restore_path, text_encoder.hidden_size)
    lora_file = _reference_lora_file(restore_path)
    if lora_file is not None:
        spec, state = _reference_lora(lora_file, restore_path)
        known = dict(nnet.named_modules())
        absent = [m for m in spec.target_modules if m not in known]
        if absent:
            raise CheckpointError(f"{lora_file} adapts modules this U-ViT does not have: {absent[:4]}")
        add_lora(nnet, spec)
        load_lora_state(nnet, state, lora_file)
        meta["uvit_lora"] = spec.to_dict()
        meta["source_files"].append(lora_file.name)
    if token is not None:
        name, rows = token
        try:
            text_encoder.add_modifier_token(name, rows, num_vectors=rows.shape[0])
        except ValueError as error:
            raise CheckpointError(f"{restore_path}: cannot add token {name!r}: {error}") from error
        meta["source_files"].extend(p.name for p in _reference_token_files(restore_path))
    nnet.eval()
    text_encoder.eval()
    return Personalization(kind="reference_entry", path=restore_path, meta=meta,
                           modifier_token=token[0] if token else None)


# --- spec §7: how many parameters were changed -------------------------------------------------------


def _canonical(name: str) -> str:
    """peft renames a wrapped weight `x.weight` -> `x.base_layer.weight`; compare it under its original name."""
    return name.replace(".base_layer.", ".")


def count_changed_parameters(current: Iterable[tuple[str, torch.Tensor]], original: Mapping[str, torch.Tensor]) -> int:
    """Spec §7 for one model: same name+shape but other values -> numel; same name, other shape -> both
    numels; a name on one side only -> its numel. `current` are the named parameters of the model as
    loaded for sampling (adapters unmerged), `original` a fresh copy's state dict."""
    seen = set()
    changed = 0
    for name, tensor in current:
        name = _canonical(name)
        seen.add(name)
        if name not in original:
            changed += tensor.numel()
            continue
        reference = original[name]
        if tuple(reference.shape) != tuple(tensor.shape):
            changed += tensor.numel() + reference.numel()
        elif not torch.equal(tensor.detach().to("cpu", reference.dtype), reference):
            changed += tensor.numel()
    changed += sum(t.numel() for n, t in original.items() if n not in seen)
    return changed


def count_finetuned_parameters(config, nnet: nn.Module, autoencoder: nn.Module, text_encoder: CLIPTextEncoder) -> int:
    """Spec §7 summed over U-ViT, VAE and CLIP text encoder, each against a fresh original from its file.

    Call it after the personalization is loaded and before adapters are merged or weights cast.
    """
    nnet_file = resolve_path(config.paths.nnet)
    total = count_changed_parameters(nnet.named_parameters(), load_torch_state_dict(nnet_file, "U-ViT checkpoint"))
    vae_file = resolve_path(config.paths.autoencoder)
    total += count_changed_parameters(autoencoder.named_parameters(),
                                      load_torch_state_dict(vae_file, "autoencoder checkpoint"))
    total += count_changed_parameters(text_encoder.transformer.named_parameters(), original_text_encoder_state(config))
    return total
