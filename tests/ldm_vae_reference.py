"""Test oracle: an independent statement of the official LDM KL VAE (latent-diffusion's
`ldm/modules/diffusionmodules/model.py` Encoder/Decoder + `AutoencoderKL`), used only by tests.

The production VAE is diffusers' AutoencoderKL loaded through diffusers' LDM key conversion
(libs/models/autoencoder.py, libs/models/loading.py). This file keeps the LDM module names, so
`state_dict()` is natively in the layout of the official `autoencoder_kl.pth`: tests save it as a file
in the real format and check that what the production loader builds from that file computes the same.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=padding)


class ResnetBlock(nn.Module):
    """Pre-activation residual block (no time embedding: the VAE is unconditional)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = _conv3x3(in_channels, out_channels)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv3x3(out_channels, out_channels)
        # a 1x1 projection only where the width changes (nn.Identity adds no checkpoint keys)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-conv projections as in LDM."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, 1 head, H*W, C]
            return t.reshape(b, c, h * w).transpose(1, 2).unsqueeze(1)

        # default scale is C**-0.5, the LDM scale for one head of width C
        out = F.scaled_dot_product_attention(tokens(self.q(y)), tokens(self.k(y)), tokens(self.v(y)))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Asymmetric (right/bottom) zero pad, then a 3x3 stride-2 conv: halves H and W exactly."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv3x3(channels, channels, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock -> AttnBlock -> ResnetBlock at the lowest resolution (the VAE's only attention)."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def _res_blocks(channels: Sequence[int], dropout: float) -> nn.ModuleList:
    """Res blocks taking channels[0] -> channels[1] -> ... (only the first changes the width)."""
    return nn.ModuleList(ResnetBlock(cin, cout, dropout) for cin, cout in zip(channels, channels[1:]))


class DownLevel(nn.Module):
    """One encoder resolution level: res blocks, then a downsample except at the coarsest level."""

    def __init__(self, channels: Sequence[int], dropout: float, downsample: bool) -> None:
        super().__init__()
        self.block = _res_blocks(channels, dropout)
        self.downsample = Downsample(channels[-1]) if downsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return self.downsample(x)


class UpLevel(nn.Module):
    """One decoder resolution level: res blocks, then an upsample except at the finest level."""

    def __init__(self, channels: Sequence[int], dropout: float, upsample: bool) -> None:
        super().__init__()
        self.block = _res_blocks(channels, dropout)
        self.upsample = Upsample(channels[-1]) if upsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return self.upsample(x)


class Encoder(nn.Module):
    """Image [B, in_channels, H, W] -> [B, 2*z_channels (or z_channels), H/f, W/f], f = 2**(levels-1)."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        dropout: float,
        in_channels: int,
        z_channels: int,
        double_z: bool,
    ) -> None:
        super().__init__()
        self.conv_in = _conv3x3(in_channels, ch)
        self.down = nn.ModuleList()
        block_in = ch
        for i, mult in enumerate(ch_mult):
            block_out = ch * mult
            last = i == len(ch_mult) - 1
            self.down.append(DownLevel([block_in] + [block_out] * num_res_blocks, dropout, downsample=not last))
            block_in = block_out
        self.mid = MidBlock(block_in, dropout)
        self.norm_out = _norm(block_in)
        self.conv_out = _conv3x3(block_in, 2 * z_channels if double_z else z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, z_channels, h, w] -> image [B, out_ch, h*f, w*f]; `up` is indexed like the encoder's `down`."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        dropout: float,
        out_ch: int,
        z_channels: int,
    ) -> None:
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = _conv3x3(z_channels, block_in)
        self.mid = MidBlock(block_in, dropout)
        levels: list[UpLevel] = []
        for i in reversed(range(len(ch_mult))):  # built coarsest first, stored finest first (LDM order)
            block_out = ch * ch_mult[i]
            levels.insert(0, UpLevel([block_in] + [block_out] * (num_res_blocks + 1), dropout, upsample=i != 0))
            block_in = block_out
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in)
        self.conv_out = _conv3x3(block_in, out_ch)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class LDMAutoencoderKL(nn.Module):
    """The KL VAE with the scale factor folded in: `encode` returns diffusion latents, `decode` takes them.

    Arguments are the keys of `config.autoencoder`. `resolution` is the training resolution of the
    original model; in LDM it only places attention by resolution, which this VAE does not do
    (`attn_resolutions` must be empty: attention lives in the mid blocks only).
    """

    def __init__(
        self,
        double_z: bool,
        z_channels: int,
        resolution: int,
        in_channels: int,
        out_ch: int,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float,
        embed_dim: int,
        scale_factor: float,
    ) -> None:
        super().__init__()
        if not double_z:
            raise ValueError("LDMAutoencoderKL needs double_z=True: the encoder must predict mean and log-variance")
        if len(attn_resolutions) != 0:
            raise ValueError(
                f"attn_resolutions={tuple(attn_resolutions)} is not supported: "
                "the UniDiffuser VAE has attention only in the mid blocks"
            )
        self.resolution = resolution
        self.scale_factor = float(scale_factor)
        self.embed_dim = embed_dim
        ch_mult = tuple(ch_mult)
        self.encoder = Encoder(
            ch=ch,
            ch_mult=ch_mult,
            num_res_blocks=num_res_blocks,
            dropout=dropout,
            in_channels=in_channels,
            z_channels=z_channels,
            double_z=double_z,
        )
        self.decoder = Decoder(
            ch=ch,
            ch_mult=ch_mult,
            num_res_blocks=num_res_blocks,
            dropout=dropout,
            out_ch=out_ch,
            z_channels=z_channels,
        )
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior moments [B, 2*embed_dim, H/8, W/8] (mean, logvar) of pixels `x` in [-1, 1].

        Kept separate from sampling so a data cache can store moments and draw fresh latents each epoch.
        """
        return self.quant_conv(self.encoder(x))

    def sample(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw a scaled latent from the diagonal Gaussian posterior (the official encode *samples*)."""
        mean, logvar = torch.chunk(moments, 2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + std * noise) * self.scale_factor

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] -> diffusion latents (posterior sample times `scale_factor`)."""
        return self.sample(self.encode_moments(x), generator=generator)

    def decode(self, z: torch.Tensor, slice_size: int | None = None) -> torch.Tensor:
        """Diffusion latents -> pixels, roughly in [-1, 1].

        `slice_size` decodes the batch in chunks of that many latents: at 512x512 the decoder's
        activations dominate memory, and the result matches one big batch up to float rounding.
        """
        if slice_size is not None and slice_size < 1:
            raise ValueError(f"slice_size must be >= 1, got {slice_size}")
        if slice_size is None or slice_size >= z.shape[0]:
            return self.decoder(self.post_quant_conv(z / self.scale_factor))
        return torch.cat([self.decode(chunk) for chunk in torch.split(z, slice_size)], dim=0)
