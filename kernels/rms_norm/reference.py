"""RMSNorm as transformers' Llama computes it: normalise in float32, cast back, then scale."""

from __future__ import annotations

import torch

from ..precision import compute_dtype


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x: (..., N); weight: (N,). Returns weight * (x / sqrt(mean(x^2) + eps)) in x's dtype."""
    h = x.to(compute_dtype(x.dtype))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)
