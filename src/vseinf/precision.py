"""Which dtype training autocasts to: ``train.precision`` = "fp32", "bf16" or "auto".

bf16 autocast only pays where the hardware multiplies bf16 natively: CUDA GPUs with bf16 support,
and CPUs with AVX-512 BF16 / AMX (oneDNN's bf16 kernels). Elsewhere PyTorch falls back to a scalar
bf16 GEMM that is several times *slower* than fp32 (6.2× on an AVX2-only 2-core CPU for the grid
head's 6272 × 1280 × 1024 product), so "auto" picks bf16 only where it is fast.
"""

from __future__ import annotations

import torch

PRECISIONS = ("fp32", "bf16", "auto")


def bf16_is_fast(device: torch.device | str) -> bool:
    """Whether ``device`` has native bf16 matrix multiplication."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """"fp32" or "bf16" for ``precision`` on ``device`` ("auto": bf16 where it is fast)."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    return precision


def autocast(precision: str, device: torch.device | str) -> torch.autocast:
    """The autocast context of a training step (disabled for fp32)."""
    device = torch.device(device)
    dtype = resolve_precision(precision, device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
