"""CLIP towers used by UniDiffuser: the ViT-L/14 text encoder (with personalization tokens) and the
ViT-B/32 image encoder, both through transformers, with OpenAI's exact image preprocessing.
Pure module code: the towers are built from folders by libs/models/loading.py."""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_LENGTH = 77


def clip_image_preprocess(images: Sequence[Image.Image], size: int = 224) -> torch.Tensor:
    """OpenAI CLIP preprocessing: short side to `size` (bicubic), center crop, CLIP mean/std.

    Returns a float32 [B, 3, size, size] tensor.
    """
    batch = []
    for image in images:
        image = image.convert("RGB")
        width, height = image.size
        scale = size / min(width, height)
        new_w, new_h = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
        if scale != 1 or (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), Image.BICUBIC)
        left = int(round((new_w - size) / 2.0))
        top = int(round((new_h - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
        array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        batch.append(array)
    pixels = torch.stack(batch)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


class ExtendedTokenEmbedding(nn.Module):
    """The CLIP token embedding plus separately stored rows for new tokens.

    The original matrix keeps its name (`weight`) and shape, so the changed-parameter count of
    spec §7 sees only the new rows (`extra_weight`), never a resized vocabulary.
    """

    def __init__(self, base: nn.Embedding, extra_rows: torch.Tensor):
        super().__init__()
        self.weight = base.weight
        self.extra_weight = nn.Parameter(extra_rows.clone())

    @property
    def base_vocab_size(self) -> int:
        return self.weight.shape[0]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        vocab = self.base_vocab_size
        is_new = (input_ids >= vocab).unsqueeze(-1)
        base = F.embedding(input_ids.clamp(max=vocab - 1), self.weight)
        new = F.embedding((input_ids - vocab).clamp(min=0), self.extra_weight.to(base.dtype))
        return torch.where(is_new, new, base)


class CLIPTextEncoder(nn.Module):
    """CLIP ViT-L/14 text tower: prompts -> last_hidden_state [B, 77, 768] (pad to max length, truncate)."""

    def __init__(self, tokenizer: CLIPTokenizer, transformer: CLIPTextModel, max_length: int = MAX_LENGTH):
        super().__init__()
        self.tokenizer = tokenizer
        self.transformer = transformer
        self.max_length = max_length
        self.new_tokens: list[str] = []
        self.modifier_token: str | None = None

    @property
    def token_embedding(self) -> nn.Module:
        return self.transformer.get_input_embeddings()

    @property
    def hidden_size(self) -> int:
        return self.transformer.config.hidden_size

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            [self.expand_prompt(p) for p in prompts],
            truncation=True,
            max_length=self.max_length,
            padding="max_length",
            return_tensors="pt",
        )
        return tokens.input_ids

    def count_tokens(self, prompt: str) -> int:
        """CLIP tokens of a prompt, start and end tokens included; more than `max_length` are cut off."""
        return len(self.tokenizer(self.expand_prompt(prompt), truncation=False, verbose=False).input_ids)

    def forward(self, prompts: Sequence[str] | torch.Tensor) -> torch.Tensor:
        input_ids = prompts if isinstance(prompts, torch.Tensor) else self.tokenize(prompts)
        input_ids = input_ids.to(self.transformer.device)
        return self.transformer(input_ids=input_ids).last_hidden_state

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Inference-time encoding (no graph)."""
        with torch.no_grad():
            return self(prompts)

    # --- personalization tokens -------------------------------------------------------------

    def add_modifier_token(self, token: str, initializer: str | torch.Tensor, num_vectors: int = 1) -> list[int]:
        """Add `token` (and `token_1`..`token_{n-1}` for a multi-vector token) with rows initialized
        from `initializer`: a word (mean of its BPE token embeddings) or a [n, D] / [D] tensor."""
        if self.new_tokens:
            raise ValueError(f"a modifier token is already added ({self.modifier_token}); add one per encoder")
        if num_vectors < 1:
            raise ValueError(f"num_vectors must be >= 1, got {num_vectors}")
        names = [token] + [f"{token}_{i}" for i in range(1, num_vectors)]
        vocab = self.tokenizer.get_vocab()
        clashes = [n for n in names if n in vocab or f"{n}</w>" in vocab]
        if clashes or self.tokenizer.add_tokens(names) != len(names):
            raise ValueError(f"token {token!r} already exists in the CLIP vocabulary; pick a new string such as <new1>")
        base: nn.Embedding = self.token_embedding
        rows = self._initial_rows(initializer, num_vectors, base.weight)
        extended = ExtendedTokenEmbedding(base, rows)
        self.transformer.set_input_embeddings(extended)
        self.new_tokens = names
        self.modifier_token = token
        ids = self.tokenizer.convert_tokens_to_ids(names)
        if ids != list(range(base.weight.shape[0], base.weight.shape[0] + num_vectors)):
            raise RuntimeError(f"unexpected ids {ids} for new tokens; the tokenizer vocabulary and the embedding differ")
        return ids

    def _initial_rows(self, initializer: str | torch.Tensor, num_vectors: int, weight: torch.Tensor) -> torch.Tensor:
        if isinstance(initializer, torch.Tensor):
            rows = initializer.detach().to(weight.dtype).reshape(-1, weight.shape[1])
            if rows.shape[0] == 1:
                rows = rows.expand(num_vectors, -1)
            if rows.shape[0] != num_vectors:
                raise ValueError(f"initializer has {rows.shape[0]} rows, the token has {num_vectors} vectors")
            return rows.clone()
        ids = self.tokenizer(initializer, add_special_tokens=False).input_ids
        if not ids:
            raise ValueError(f"initializer token {initializer!r} encodes to nothing")
        row = weight.detach()[ids].mean(dim=0)
        return row.unsqueeze(0).repeat(num_vectors, 1)

    def expand_prompt(self, prompt: str) -> str:
        """A multi-vector token stands for all its vectors: "<new1>" -> "<new1> <new1>_1 ..."."""
        if self.modifier_token is None or len(self.new_tokens) == 1:
            return prompt
        pattern = re.escape(self.modifier_token) + r"(?!_\d)"
        return re.sub(pattern, " ".join(self.new_tokens), prompt)

    def new_token_rows(self) -> torch.Tensor:
        """The trained rows [n, D] of the modifier token (empty when none was added)."""
        if not self.new_tokens:
            return torch.empty(0, self.hidden_size)
        return self.token_embedding.extra_weight.detach()


class CLIPImageEncoder(nn.Module):
    """CLIP ViT-B/32 image tower: images -> `image_embeds` (projection output, not normalized)."""

    def __init__(self, model: CLIPVisionModelWithProjection):
        super().__init__()
        self.model = model
        self.image_size = self.model.config.image_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values.to(self.model.device, self.model.dtype)).image_embeds

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self(clip_image_preprocess(images, self.image_size))
