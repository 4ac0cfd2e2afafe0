"""The trained model: the base towers frozen, a LoRA on the U-ViT, the new token (and optionally
adapters or all weights) in the CLIP text tower, wrapped as one module so that one forward per step
covers every trainable tensor."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from libs.adapters.families import AdapterSpec, add_adapter
from libs.adapters.lora import LoraSpec, add_lora, text_lora_modules, uvit_lora_modules
from libs.models.loading import load_autoencoder, load_caption_decoder, load_text_encoder, load_uvit
from libs.train.plan import Plan, TrainingError


class JointNoisePredictor(nn.Module):
    """The U-ViT with its text path (CLIP text tower -> encode_prefix) as one module, so that one
    forward per step covers every trainable tensor (what DistributedDataParallel needs)."""

    def __init__(self, nnet: nn.Module, text_encoder: nn.Module, caption_prefix: nn.Module, data_type: int):
        super().__init__()
        # plain attribute assignments (boilerplate shared with libs/models/uvit.py's constructor)
        self.nnet = nnet
        self.text_encoder = text_encoder
        self.caption_prefix = caption_prefix
        self.data_type = data_type

    def encode_text(self, input_ids: Tensor) -> Tensor:
        """Token ids [B, 77] -> U-ViT text tokens [B, 77, text_dim]; repeated prompts are encoded once."""
        unique, inverse = torch.unique(input_ids, dim=0, return_inverse=True)
        return self.caption_prefix(self.text_encoder(unique))[inverse]

    def forward(self, z_t: Tensor, clip_t: Tensor, timesteps: Tensor, text_ids: Tensor | None,
                text_cached: Tensor | None) -> tuple[Tensor, Tensor]:
        """Noise predictions for (z, clip_img); the text rows are `text_ids` encoded now, then `text_cached`."""
        parts = []
        if text_ids is not None:
            parts.append(self.encode_text(text_ids.to(z_t.device)))
        if text_cached is not None:
            parts.append(text_cached.to(z_t.device))
        text = torch.cat(parts) if len(parts) > 1 else parts[0]
        batch = z_t.shape[0]
        t_text = torch.zeros(batch, device=z_t.device)
        data_type = torch.full((batch,), self.data_type, dtype=torch.long, device=z_t.device)
        img_out, clip_out, _ = self.nnet(z_t, clip_t, text, timesteps.to(z_t.device, torch.float32), t_text, data_type)
        return img_out, clip_out


@dataclass
class Models:
    """The model being trained, the frozen VAE, and the adapter settings personalization.json records."""

    model: JointNoisePredictor
    autoencoder: nn.Module
    uvit_spec: AdapterSpec | None  # None: --adapter none
    text_spec: LoraSpec | None

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]


def build_models(plan: Plan, device: torch.device, weight_dtype: torch.dtype) -> Models:
    """Base towers frozen in `weight_dtype`; adapters, token rows and trained text weights in fp32."""
    config = plan.config
    cfg = config.train
    nnet = load_uvit(config, "cpu", torch.float32)
    uvit_spec = None
    if cfg.adapter != "none":
        uvit_spec = AdapterSpec.from_config(cfg, uvit_lora_modules(nnet, list(cfg.lora_targets)), int(config.seed))
        add_adapter(nnet, uvit_spec)
    nnet.set_gradient_checkpointing(bool(cfg.gradient_checkpointing))

    text_encoder = load_text_encoder(config, "cpu")
    mode = cfg.text_encoder_mode
    if plan.token:
        try:
            text_encoder.add_modifier_token(plan.token, plan.initializer, int(cfg.num_vectors))
        except ValueError as error:
            raise TrainingError(f"modifier token: {error}") from error
    text_spec = None
    if mode == "lora":
        text_spec = LoraSpec(r=int(cfg.text_lora_rank), alpha=float(cfg.text_lora_alpha),
                             dropout=float(cfg.lora_dropout), target_modules=text_lora_modules(text_encoder))
        add_lora(text_encoder.transformer, text_spec)
    caption_prefix = load_caption_decoder(config, "cpu", torch.float32)

    model = JointNoisePredictor(nnet, text_encoder, caption_prefix, int(config.data_type)).requires_grad_(False)
    for name, param in nnet.named_parameters():
        param.requires_grad_(uvit_spec is not None and uvit_spec.prefix in name)
    if plan.token:
        text_encoder.token_embedding.extra_weight.requires_grad_(True)
    if mode == "lora":
        for name, param in text_encoder.transformer.named_parameters():
            if "lora_" in name:
                param.requires_grad_(True)
    elif mode == "full":
        text_encoder.transformer.requires_grad_(True)
    # one conversion per tensor, straight to the device: the frozen weights (memory-mapped fp32) never exist
    # as a second full copy in fp32 on the device nor in weight_dtype on the host
    for param in model.parameters():
        param.data = param.data.to(device, torch.float32 if param.requires_grad else weight_dtype)
    model.to(device)  # buffers
    if weight_dtype != torch.float32:
        # autocast runs the LoRA matmuls in weight_dtype anyway: skip peft's fp32 copy of every LoRA input
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.cast_input_dtype_enabled = False
    if cfg.compile:
        nnet.compile()
    autoencoder = load_autoencoder(config, device, torch.float32)
    return Models(model, autoencoder, uvit_spec, text_spec)


def count_trainable(module: nn.Module) -> int:
    """The exact number of trained parameters (what sample.py's changed-parameter count will find)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
