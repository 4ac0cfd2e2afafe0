"""The UniDiffuser-v1 image autoencoder (spec §4): the Stable-Diffusion-style KL VAE of latent-diffusion,
run by diffusers' maintained `AutoencoderKL`.

This wrapper adds only what the pipeline needs on top of it: the scale factor folded in (`encode`
returns diffusion latents, `decode` takes them), posterior moments apart from sampling (the training
cache stores moments and draws fresh latents each epoch), and sliced decoding. Parameters carry
diffusers' names under `vae.`; the official file is in the LDM layout, which libs/models/loading.py
converts in both directions.
"""
from __future__ import annotations

from typing import Sequence

import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn


class AutoencoderKL(nn.Module):
    """The KL VAE built from the LDM hyper-parameters (the keys of `config.autoencoder`).

    The LDM options diffusers' network does not have are rejected rather than ignored: attention at
    given resolutions (`attn_resolutions`; this VAE has attention in the mid blocks only), a single-z
    encoder (`double_z=False`), an `embed_dim` other than `z_channels` and dropout. `resolution` is the
    original training resolution (diffusers' `sample_size`; it only sizes diffusers' unused tiling).
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
            raise ValueError("AutoencoderKL needs double_z=True: the encoder must predict mean and log-variance")
        if len(attn_resolutions) != 0:
            raise ValueError(
                f"attn_resolutions={tuple(attn_resolutions)} is not supported: "
                "the UniDiffuser VAE has attention only in the mid blocks"
            )
        if embed_dim != z_channels:
            raise ValueError(f"embed_dim={embed_dim} must equal z_channels={z_channels} (diffusers' AutoencoderKL)")
        if dropout != 0.0:
            raise ValueError(f"dropout={dropout} is not supported: diffusers' AutoencoderKL has no dropout")
        self.scale_factor = float(scale_factor)
        levels = len(ch_mult)
        self.vae = DiffusersAutoencoderKL(
            in_channels=in_channels,
            out_channels=out_ch,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=tuple(ch * mult for mult in ch_mult),
            layers_per_block=num_res_blocks,
            latent_channels=z_channels,
            sample_size=resolution,
            scaling_factor=self.scale_factor,
        )

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior moments [B, 2*embed_dim, H/8, W/8] (mean, logvar) of pixels `x` in [-1, 1]."""
        return self.vae.encode(x).latent_dist.parameters

    def sample(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw a scaled latent from the diagonal Gaussian posterior (logvar clamped to [-30, 20]; the
        official encode *samples*)."""
        return DiagonalGaussianDistribution(moments).sample(generator=generator) * self.scale_factor

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
            return self.vae.decode(z / self.scale_factor).sample
        return torch.cat([self.decode(chunk) for chunk in torch.split(z, slice_size)], dim=0)
