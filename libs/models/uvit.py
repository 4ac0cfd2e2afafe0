"""The UniDiffuser-v1 U-ViT ("uvit_multi_post_ln_v1"): one transformer over time, data-type, text,
CLIP-image and latent-patch tokens that predicts the noise of all three modalities.

Parameter names and shapes equal the official `uvit_v1.pth` (418 keys), so the checkpoint loads
strictly and peft can target `attn.qkv`, `attn.proj`, `mlp.fc1`, `mlp.fc2`, `text_embed`, `clip_img_embed`.
Hand-written because no library has this network; pure `nn.Module` code (loading: libs/models/loading.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from torch import nn

ATTENTION_MODES = ("sdpa", "math")


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Raw sinusoidal embedding of (possibly fractional) timesteps, cos half first, as the official model."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.mode = "sdpa"
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        dropout = self.attn_drop if self.training else 0.0
        if self.mode == "sdpa":
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:  # the official fallback: explicit softmax in fp32 (kept to measure what SDPA saves)
            attn = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5
            attn = F.dropout(attn.softmax(dim=-1), dropout)
            x = (attn @ v.float()).to(q.dtype)
        return self.proj_drop(self.proj(rearrange(x, "B H L D -> B L (H D)")))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Post-LayerNorm transformer block; out-blocks first fuse the long skip (linear on [x, skip], then norm)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float,
                 skip: bool = False, use_checkpoint: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim) if skip else None
        self.norm2 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, skip, use_reentrant=False)
        return self._forward(x, skip)

    def _forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.norm1(self.skip_linear(torch.cat([x, skip], dim=-1)))
        x = self.norm2(x + self.attn(x))
        return self.norm3(x + self.mlp(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(f"latent size {tuple(x.shape[-2:])} is not a multiple of the patch size {self.patch_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


class UViT(nn.Module):
    """forward(img, clip_img, text, t_img, t_text, data_type) -> (img_out, clip_img_out, text_out), all epsilon."""

    def __init__(self, img_size: int, in_chans: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                 mlp_ratio: float, qkv_bias: bool, pos_drop_rate: float, drop_rate: float, attn_drop_rate: float,
                 mlp_time_embed: bool, text_dim: int, num_text_tokens: int, clip_img_dim: int,
                 use_checkpoint: bool = False):
        super().__init__()
        # plain attribute assignments (the same shape as other modules' constructors: boilerplate, not a twin)
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.img_size = img_size
        self.num_patches = (img_size // patch_size) ** 2
        self.num_text_tokens = num_text_tokens

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.time_img_embed = self._time_mlp(embed_dim) if mlp_time_embed else nn.Identity()
        self.time_text_embed = self._time_mlp(embed_dim) if mlp_time_embed else nn.Identity()
        self.text_embed = nn.Linear(text_dim, embed_dim)
        self.text_out = nn.Linear(embed_dim, text_dim)
        self.clip_img_embed = nn.Linear(clip_img_dim, embed_dim)
        self.clip_img_out = nn.Linear(embed_dim, clip_img_dim)

        # positions for [t_img, t_text, 77 text, clip_img, patches]; the data-type token has its own
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + 1 + num_text_tokens + 1 + self.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        block = dict(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                     attn_drop=attn_drop_rate, use_checkpoint=use_checkpoint)
        self.in_blocks = nn.ModuleList([Block(**block) for _ in range(depth // 2)])
        self.mid_block = Block(**block)
        self.out_blocks = nn.ModuleList([Block(**block, skip=True) for _ in range(depth // 2)])

        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_pred = nn.Linear(embed_dim, patch_size**2 * in_chans)
        self.token_embedding = nn.Embedding(2, embed_dim)
        self.pos_embed_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self._init_weights()

    @staticmethod
    def _time_mlp(dim: int) -> nn.Module:
        return nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))

    def _init_weights(self) -> None:
        """The official init (truncated normal 0.02 for linears and positions), so fresh models train sanely."""
        if self.pos_embed.is_meta:
            return
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        for block in self.blocks():
            block.use_checkpoint = enabled

    def compile_blocks(self, **options) -> None:
        """Regional compilation: `torch.compile` each transformer block instead of the whole network. The 31
        blocks share their code, so the compiler traces one in-block and one out-block (skip) graph and
        reuses them: compile time is a block's, not the network's, for the same fused kernels inside a
        block. `options` go to torch.compile (e.g. mode="max-autotune-no-cudagraphs")."""
        for block in self.blocks():
            block.compile(**options)

    def set_attention_mode(self, mode: str) -> None:
        """"sdpa" (default: fused kernels, input dtype) or "math" (explicit fp32 softmax, as the official code)."""
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention mode {mode!r} not in {ATTENTION_MODES}")
        for block in self.blocks():
            block.attn.mode = mode

    def blocks(self) -> list[Block]:
        return [*self.in_blocks, self.mid_block, *self.out_blocks]

    def position_embedding(self, height: int, width: int) -> torch.Tensor:
        """[1, 1105, D] positions in token order; the patch grid is bilinearly resized for other latent sizes."""
        head, patches = self.pos_embed[:, : -self.num_patches], self.pos_embed[:, -self.num_patches:]
        grid = self.img_size // self.patch_size
        new_grid = (height // self.patch_size, width // self.patch_size)
        if new_grid != (grid, grid):
            patches = rearrange(patches, "B (H W) C -> B C H W", H=grid, W=grid)
            patches = F.interpolate(patches, new_grid, mode="bilinear")
            patches = rearrange(patches, "B C H W -> B (H W) C")
        return torch.cat([head[:, :2], self.pos_embed_token, head[:, 2:], patches], dim=1)

    def forward(self, img: torch.Tensor, clip_img: torch.Tensor, text: torch.Tensor, t_img: torch.Tensor,
                t_text: torch.Tensor, data_type: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        height, width = img.shape[-2:]
        img_tokens = self.patch_embed(img)
        t_img_token = self.time_img_embed(timestep_embedding(t_img, self.embed_dim).to(img_tokens.dtype)).unsqueeze(1)
        t_text_token = self.time_text_embed(timestep_embedding(t_text, self.embed_dim).to(img_tokens.dtype)).unsqueeze(1)
        text_tokens = self.text_embed(text)
        clip_img_token = self.clip_img_embed(clip_img)
        type_token = self.token_embedding(data_type.long()).unsqueeze(1)

        x = torch.cat([t_img_token, t_text_token, type_token.to(img_tokens.dtype), text_tokens, clip_img_token, img_tokens], dim=1)
        x = self.pos_drop(x + self.position_embedding(height, width).to(x.dtype))

        skips = []
        for block in self.in_blocks:
            x = block(x)
            skips.append(x)
        x = self.mid_block(x)
        for block in self.out_blocks:
            x = block(x, skips.pop())
        x = self.norm(x)

        num_text, num_img = text_tokens.shape[1], img_tokens.shape[1]
        _, _, _, text_out, clip_img_out, img_out = x.split((1, 1, 1, num_text, 1, num_img), dim=1)
        img_out = rearrange(self.decoder_pred(img_out), "B (h w) (p1 p2 C) -> B C (h p1) (w p2)",
                            h=height // self.patch_size, p1=self.patch_size, p2=self.patch_size)
        return img_out, self.clip_img_out(clip_img_out), self.text_out(text_out)
