"""One training step's batch and its loss (spec §5).

Each sample gets one timestep n in 1..1000 shared by its image latent z (drawn from the cached VAE
posterior) and its CLIP image embedding, independent Gaussian noise for each, and
x_n = sqrt(abar_n) x_0 + sqrt(1 - abar_n) eps with the Stable-Diffusion betas (libs.diffusion, the
schedule the sampler uses too). The U-ViT predicts both noises; the loss is

    instance_loss_weight x MSE(z, instance rows) + prior_loss_weight x MSE(z, class rows)
    + clip_img_loss_weight x MSE(clip_img, all rows).

Everything random in step k (which views, posterior samples, timesteps, noise, dropout) is drawn from
generators keyed by (seed, k, process), so a resumed run repeats exactly what an uninterrupted one does.
"""
from __future__ import annotations

from dataclasses import dataclass

import ml_collections
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from libs.diffusion import N_TRAIN_STEPS, add_noise, alphas_cumprod, keyed_generator
from libs.train.encodings import TrainData

# independent random streams of one step
STREAM_INSTANCE, STREAM_CLASS, STREAM_NOISE, STREAM_DROPOUT, STREAM_EVAL = range(1, 6)


class ViewSampler:
    """Which views a step uses: epochs of seeded permutations, so every view is seen equally often.

    Stateless: the views of step k depend only on (seed, k, process), which makes resuming exact.
    """

    def __init__(self, num_views: int, batch_size: int, seed: int, rank: int, stream: int):
        self.num_views, self.batch_size = num_views, batch_size
        self.keys = (seed, rank, stream)
        self._perms: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.num_views, generator=keyed_generator(*self.keys, epoch))}
        return self._perms[epoch]

    def __call__(self, step: int) -> Tensor:
        positions = range((step - 1) * self.batch_size, step * self.batch_size)
        return torch.stack([self._perm(p // self.num_views)[p % self.num_views] for p in positions])


@dataclass
class Batch:
    """Noisy inputs, their noise targets and the text rows: instance rows first, then class rows."""

    z_t: Tensor
    clip_t: Tensor
    timesteps: Tensor
    eps_z: Tensor
    eps_clip: Tensor
    text_ids: Tensor | None
    text_cached: Tensor | None
    num_instance: int


def dropout_seed(seed: int, step: int, rank: int) -> int:
    """The global torch seed for step k's dropout masks (LoRA dropout draws from torch's default generator)."""
    return keyed_generator(seed, step, rank, STREAM_DROPOUT).initial_seed()


def noisy_batch(moments: Tensor, clip: Tensor, autoencoder: nn.Module, abar: Tensor, generator: torch.Generator,
                timesteps: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Posterior sample z_0, then (z_n, clip_n, n, eps_z, eps_clip) with one n per sample shared by both."""
    z0 = autoencoder.sample(moments, generator=generator)
    clip0 = clip.unsqueeze(1)
    batch = z0.shape[0]
    if timesteps is None:
        timesteps = torch.randint(1, N_TRAIN_STEPS + 1, (batch,), generator=generator)
    eps_z = torch.randn(z0.shape, generator=generator)
    eps_clip = torch.randn(clip0.shape, generator=generator)
    z_t, clip_t = add_noise(z0, eps_z, timesteps, abar), add_noise(clip0, eps_clip, timesteps, abar)
    return z_t, clip_t, timesteps, eps_z, eps_clip


class BatchMaker:
    """Builds step k's batch: instance views first, then class views; all randomness keyed by (seed, k, rank)."""

    def __init__(self, data: TrainData, cfg: ml_collections.ConfigDict, autoencoder: nn.Module, seed: int, rank: int):
        self.data, self.autoencoder, self.seed, self.rank = data, autoencoder, seed, rank
        self.abar = alphas_cumprod()
        self.instance_views = ViewSampler(len(data.instance), int(cfg.batch_size), seed, rank, STREAM_INSTANCE)
        self.class_views = (ViewSampler(len(data.classes), int(cfg.class_batch_size), seed, rank, STREAM_CLASS)
                            if data.classes is not None else None)

    def __call__(self, step: int) -> Batch:
        data = self.data
        views = self.instance_views(step)
        moments, clip = data.instance.lookup(views)
        instance_ids, instance_encoded = data.instance_text(len(views))
        ids = [instance_ids] if instance_ids is not None else []
        cached = [instance_encoded] if instance_encoded is not None else []
        if self.class_views is not None:
            class_views = self.class_views(step)
            class_moments, class_clip = data.classes.lookup(class_views)
            moments, clip = torch.cat([moments, class_moments]), torch.cat([clip, class_clip])
            images = class_views // data.classes.num_flips
            if data.class_text is not None:
                cached.append(data.class_text[images])
            else:
                ids.append(data.class_ids[images])
        generator = keyed_generator(self.seed, step, self.rank, STREAM_NOISE)
        z_t, clip_t, n, eps_z, eps_clip = noisy_batch(moments, clip, self.autoencoder, self.abar, generator)
        return Batch(z_t, clip_t, n, eps_z, eps_clip, torch.cat(ids) if ids else None,
                     torch.cat(cached) if cached else None, len(views))


def loss_terms(model: nn.Module, batch: Batch, device: torch.device) -> dict[str, Tensor]:
    """The three MSE terms of the joint loss (fp32); `class` is absent without class rows."""
    img_out, clip_out = model(batch.z_t.to(device), batch.clip_t.to(device), batch.timesteps, batch.text_ids,
                              batch.text_cached)
    eps_z, eps_clip = batch.eps_z.to(device), batch.eps_clip.to(device)
    k = batch.num_instance
    terms = {"instance": F.mse_loss(img_out[:k].float(), eps_z[:k])}
    if img_out.shape[0] > k:
        terms["class"] = F.mse_loss(img_out[k:].float(), eps_z[k:])
    terms["clip_img"] = F.mse_loss(clip_out.float(), eps_clip)
    return terms


def total_loss(terms: dict[str, Tensor], cfg: ml_collections.ConfigDict) -> Tensor:
    """The weighted sum of the terms, with the config's three weights."""
    loss = cfg.instance_loss_weight * terms["instance"] + cfg.clip_img_loss_weight * terms["clip_img"]
    if "class" in terms:
        loss = loss + cfg.prior_loss_weight * terms["class"]
    return loss
