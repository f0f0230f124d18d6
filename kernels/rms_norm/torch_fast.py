"""The CPU path of RMSNorm: the same expression, which PyTorch already runs vectorised."""

from __future__ import annotations

import torch

from ..precision import compute_dtype


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x: (..., N); weight: (N,)."""
    h = x.to(compute_dtype(x.dtype))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)
