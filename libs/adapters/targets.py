"""The LoRA target names of the U-ViT and the CLIP text tower, with nothing heavy imported: train.py's
`--lora_targets` choices come from here, so its argument parsing and `--help` load no torch or peft."""
from __future__ import annotations

BLOCK_TARGETS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2", "skip_linear": "skip_linear"}
"""A per-block target name -> its module's path inside every transformer block."""
TOP_LEVEL_TARGETS = ("text_embed", "clip_img_embed", "text_out", "clip_img_out", "decoder_pred", "patch_embed.proj")
LORA_TARGETS = (*BLOCK_TARGETS, *TOP_LEVEL_TARGETS)
"""Every name --lora_targets accepts."""
DEFAULT_UVIT_TARGETS = ("qkv", "proj", "fc1", "fc2", "text_embed", "clip_img_embed")
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
