"""The diffusion process UniDiffuser was trained with (spec §5), shared by training and the sampler:
the Stable-Diffusion "scaled linear" betas over 1000 discrete steps, the forward noising, and the
keyed random generators that make every draw reproducible from a few integers."""
from __future__ import annotations

import hashlib

import torch
from torch import Tensor

N_TRAIN_STEPS = 1000
"""Number of discrete diffusion steps the network was trained with (t_net = t * N_TRAIN_STEPS)."""


def stable_diffusion_betas(linear_start: float = 0.00085, linear_end: float = 0.012,
                           n_timestep: int = N_TRAIN_STEPS) -> Tensor:
    """The "scaled linear" beta schedule of Stable Diffusion / UniDiffuser, in float64."""
    return torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=torch.float64) ** 2


def alphas_cumprod() -> Tensor:
    """abar_n for n = 0..1000 (abar_0 = 1), float64: index n is the product of the first n alphas."""
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1.0 - stable_diffusion_betas(), 0)])


def add_noise(x0: Tensor, noise: Tensor, n: Tensor, abar: Tensor) -> Tensor:
    """x_n = sqrt(abar_n) x_0 + sqrt(1 - abar_n) eps, per sample (computed in float64)."""
    shape = (-1,) + (1,) * (x0.dim() - 1)
    a = abar[n].view(shape)
    return (a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()).float()


def keyed_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from a stable hash of `keys` (e.g. seed, prompt index, sample index), so a
    draw depends on what it is for, not on what was drawn before it."""
    digest = hashlib.sha256("/".join(str(int(k)) for k in keys).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
