"""One training step's batch and its loss (spec §5).

Each sample gets one timestep n in 1..1000 shared by its image latent z (drawn from the cached VAE
posterior) and its CLIP image embedding, independent Gaussian noise for each, and
x_n = sqrt(abar_n) x_0 + sqrt(1 - abar_n) eps with the Stable-Diffusion betas (libs.diffusion, the
schedule the sampler uses too). The U-ViT predicts both noises; the loss is

    instance_loss_weight x MSE(z, instance rows) + prior_loss_weight x MSE(z, class rows)
    + clip_img_loss_weight x MSE(clip_img, all rows),

each MSE a mean over its rows of per-row means, and two switches (both off by default, nothing else):

* `masked_loss`: an instance row's latent MSE is the mean weighted by its person mask on the latent grid
  (background weight `mask_background_weight`), i.e. sum(w (pred - eps)^2) / sum(w): with a mask of ones
  it is the plain MSE; background cells at weight 0 get no gradient. Rows without a mask: plain MSE.
* `min_snr_gamma` > 0: every row's term is multiplied by min(SNR_n, gamma) / SNR_n (min-SNR-gamma for
  epsilon prediction, SNR_n = abar_n / (1 - abar_n)); gamma -> infinity gives the plain loss.

Everything random in step k (which views, posterior samples, timesteps, noise, dropout) is drawn from
generators keyed by (seed, k, process), so a resumed run repeats exactly what an uninterrupted one does.
"""
from __future__ import annotations

from dataclasses import dataclass

import ml_collections
import torch
from torch import Tensor, nn

from libs.diffusion import N_TRAIN_STEPS, add_noise, alphas_cumprod, keyed_generator
from libs.train.encodings import TrainData

# independent random streams of one step (libs/train/metrics.py's validation images use stream 6)
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
    instance_weight: Tensor | None = None  # [num_instance, 1, h, w] latent-cell weights (masked loss), or None
    row_weight: Tensor | None = None  # [rows] min-SNR weights, or None


def dropout_seed(seed: int, step: int, rank: int) -> int:
    """The global torch seed for step k's dropout masks (LoRA dropout draws from torch's default generator)."""
    return keyed_generator(seed, step, rank, STREAM_DROPOUT).initial_seed()


def min_snr_weights(timesteps: Tensor, gamma: float) -> Tensor:
    """min(SNR_n, gamma) / SNR_n per row (float32): the min-SNR-gamma weight of an epsilon-prediction loss."""
    abar = alphas_cumprod()[timesteps]
    snr = abar / (1 - abar)
    return (snr.clamp(max=gamma) / snr).float()


def mask_weights(masks: Tensor, background_weight: float) -> Tensor:
    """Person masks in [0, 1] -> latent-cell loss weights: 1 on the person, `background_weight` off it."""
    return background_weight + (1.0 - background_weight) * masks


def row_mse(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Per-row mean squared error [B] (fp32), weighted by `weight` (broadcast over channels) when given."""
    error = (pred.float() - target.float()).pow(2)
    if weight is None:
        return error.flatten(1).mean(1)
    weight = weight.to(error).expand_as(error)
    return (weight * error).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1e-8)


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
        self.masked = bool(cfg.masked_loss) and data.instance.has_masks
        self.background_weight = float(cfg.mask_background_weight)
        self.gamma = float(cfg.min_snr_gamma)
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
        weight = mask_weights(data.instance.mask_lookup(views), self.background_weight) if self.masked else None
        return Batch(z_t, clip_t, n, eps_z, eps_clip, torch.cat(ids) if ids else None,
                     torch.cat(cached) if cached else None, len(views), weight,
                     min_snr_weights(n, self.gamma) if self.gamma > 0 else None)


def loss_terms(model: nn.Module, batch: Batch, device: torch.device) -> dict[str, Tensor]:
    """The three MSE terms of the joint loss (fp32), with the batch's mask and min-SNR weights when it has
    them; `class` is absent without class rows."""
    img_out, clip_out = model(batch.z_t.to(device), batch.clip_t.to(device), batch.timesteps, batch.text_ids,
                              batch.text_cached)
    eps_z, eps_clip = batch.eps_z.to(device), batch.eps_clip.to(device)
    rows = torch.ones(img_out.shape[0], device=device) if batch.row_weight is None else batch.row_weight.to(device)
    k = batch.num_instance
    weight = batch.instance_weight.to(device) if batch.instance_weight is not None else None
    terms = {"instance": (row_mse(img_out[:k], eps_z[:k], weight) * rows[:k]).mean()}
    if img_out.shape[0] > k:
        terms["class"] = (row_mse(img_out[k:], eps_z[k:]) * rows[k:]).mean()
    terms["clip_img"] = (row_mse(clip_out, eps_clip) * rows).mean()
    return terms


def total_loss(terms: dict[str, Tensor], cfg: ml_collections.ConfigDict) -> Tensor:
    """The weighted sum of the terms, with the config's three weights."""
    loss = cfg.instance_loss_weight * terms["instance"] + cfg.clip_img_loss_weight * terms["clip_img"]
    if "class" in terms:
        loss = loss + cfg.prior_loss_weight * terms["class"]
    return loss
