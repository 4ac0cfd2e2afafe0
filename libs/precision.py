"""Which dtype a model computes in, the one autocast helper every module uses, and how a model's weights are
placed for low-precision inference."""
from __future__ import annotations

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MATMUL_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
"""The layers whose weights autocast feeds to its low-precision kernels (it casts their weight and bias)."""


def inference_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (the official autocast dtype), fp32 elsewhere."""
    return torch.float16 if device.type == "cuda" else torch.float32


def autocast(device: torch.device | str, dtype: torch.dtype) -> torch.autocast:
    """Compute in `dtype` (a no-op for fp32); unlike accelerate's, also fp16 on the CPU.

    Matmuls and convolutions run in `dtype`; normalization, softmax and the like in fp32 (torch's lists)."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def place_for_inference(module: nn.Module, device: torch.device | str | None, dtype: torch.dtype) -> nn.Module:
    """Move `module` to `device` with the weights and biases of its matmul layers (MATMUL_LAYERS) in `dtype`
    and every other tensor (normalization layers, embeddings, positions) as it is, each tensor converted once.

    Under `autocast(device, dtype)` this computes what the official fp32 weights compute (autocast casts a
    matmul's weight and bias to `dtype` and reads the others in full precision), without casting the large
    weights at every call; casting the normalization weights too would round them and add error (the
    fidelity guard: bench/bench_fidelity.py, checked by tests/test_bench.py)."""
    for layer in module.modules():
        low = isinstance(layer, MATMUL_LAYERS)
        for param in layer.parameters(recurse=False):
            param.data = param.data.to(device, dtype if low and param.is_floating_point() else None)
    return module.to(device)
