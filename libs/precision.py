"""Which dtype a model computes in, and the one autocast helper every module uses."""
from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def inference_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (the official autocast dtype), fp32 elsewhere."""
    return torch.float16 if device.type == "cuda" else torch.float32


def autocast(device: torch.device | str, dtype: torch.dtype) -> torch.autocast:
    """Compute in `dtype` (a no-op for fp32); unlike accelerate's, also fp16 on the CPU."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
