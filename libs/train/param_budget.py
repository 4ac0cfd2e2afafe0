"""How many parameters a training config will change, known before it trains (`--auto_max_parameters`).

The models are built on the meta device (no weights read, no memory) with the config's adapters injected
exactly as training injects them, and their trained tensors are counted: the number equals the
`trainable_parameters` the run will record (and sample.py's spec §7 count).
"""
from __future__ import annotations

import ml_collections
import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from libs.adapters.families import AdapterSpec, add_adapter
from libs.adapters.lora import LoraSpec, text_lora_modules, uvit_lora_modules
from libs.models.clip import CLIPTextEncoder
from libs.models.loading import build_uvit, text_encoder_source


def meta_uvit_adapter(config: ml_collections.ConfigDict) -> tuple[nn.Module, AdapterSpec]:
    """The U-ViT on the meta device with `config.train`'s adapter injected as training injects it; the
    adapter's tensors are the named parameters and buffers holding `spec.prefix`."""
    nnet = build_uvit(config, "meta")
    spec = AdapterSpec.from_config(config.train, uvit_lora_modules(nnet, list(config.train.lora_targets)),
                                   int(config.seed))
    add_adapter(nnet, spec, for_loading=True)
    return nnet, spec


def planned_parameters(config: ml_collections.ConfigDict) -> int:
    """The trained values of `config.train`: the U-ViT adapter, the token rows and the text-encoder part."""
    cfg = config.train
    total = 0
    if cfg.adapter != "none":
        nnet, spec = meta_uvit_adapter(config)
        total += sum(p.numel() for name, p in nnet.named_parameters() if spec.prefix in name)
    mode = cfg.text_encoder_mode
    if mode != "frozen":
        total += int(cfg.num_vectors) * int(config.clip_text_dim)  # the new token's rows
    if mode in ("lora", "full"):
        text_config = CLIPTextConfig.from_pretrained(text_encoder_source(config))
        with torch.device("meta"):
            text_model = CLIPTextModel(text_config)
        if mode == "full":
            total += sum(p.numel() for p in text_model.parameters())
        else:
            targets = text_lora_modules(CLIPTextEncoder(None, text_model))
            total += LoraSpec(r=int(cfg.text_lora_rank), alpha=float(cfg.text_lora_alpha),
                              target_modules=targets).num_parameters(text_model)
    return total
