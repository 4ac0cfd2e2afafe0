"""The caption decoder's prefix layers: `encode_prefix` maps CLIP text states (768) to the U-ViT's
64-d text tokens. Text-to-image needs nothing else, so GPT-2 is never built or loaded here."""
from __future__ import annotations

import torch
from torch import nn

from libs.checkpoint import CheckpointError, load_torch_state_dict
from libs.config import resolve_path

PREFIX = "module."
PREFIX_LAYERS = ("encode_prefix", "decode_prefix")


class CaptionDecoderPrefix(nn.Module):
    """encode_prefix: Linear(prefix_dim -> hidden_dim); decode_prefix: Linear(hidden_dim -> prefix_dim)."""

    def __init__(self, prefix_dim: int = 768, hidden_dim: int = 64):
        super().__init__()
        self.encode_prefix = nn.Linear(prefix_dim, hidden_dim)
        self.decode_prefix = nn.Linear(hidden_dim, prefix_dim)

    def forward(self, text_states: torch.Tensor) -> torch.Tensor:
        return self.encode_prefix(text_states)


def prefix_state_dict(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Pick the prefix layers out of a full caption-decoder checkpoint (`module.` prefix, GPT-2 weights,
    legacy `attn.bias`/`attn.masked_bias` buffers and `clip*` extras are all tolerated and skipped)."""
    wanted = {f"{layer}.{p}" for layer in PREFIX_LAYERS for p in ("weight", "bias")}
    picked = {}
    for key, value in state.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if name in wanted:
            picked[name] = value
    missing = sorted(wanted - set(picked))
    if missing:
        raise CheckpointError(
            f"{source} is not a UniDiffuser caption decoder: missing {', '.join(PREFIX + m for m in missing)}"
        )
    return picked


def load_caption_decoder(config, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> CaptionDecoderPrefix:
    """Prefix layers from `config.paths.caption_decoder`, frozen, in eval mode."""
    source = resolve_path(config.paths.caption_decoder)
    state = prefix_state_dict(load_torch_state_dict(source, "caption decoder (caption_decoder.pth)"), str(source))
    model = CaptionDecoderPrefix(**config.caption_decoder)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        raise CheckpointError(f"{source}: prefix layer shapes {found} do not match the config {expected}")
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
