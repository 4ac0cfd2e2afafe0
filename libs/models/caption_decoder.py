"""The caption decoder's prefix layers: `encode_prefix` maps CLIP text states (768) to the U-ViT's
64-d text tokens. Text-to-image needs nothing else, so GPT-2 is never built or loaded here."""
from __future__ import annotations

import torch
from torch import nn


class CaptionDecoderPrefix(nn.Module):
    """encode_prefix: Linear(prefix_dim -> hidden_dim); decode_prefix: Linear(hidden_dim -> prefix_dim)."""

    def __init__(self, prefix_dim: int = 768, hidden_dim: int = 64):
        super().__init__()
        self.encode_prefix = nn.Linear(prefix_dim, hidden_dim)
        self.decode_prefix = nn.Linear(hidden_dim, prefix_dim)

    def forward(self, text_states: torch.Tensor) -> torch.Tensor:
        return self.encode_prefix(text_states)
