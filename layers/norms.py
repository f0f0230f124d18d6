"""Normalisation layers: RMSNorm on zoo's fused op, and LayerNorm (RWKV's choice)."""

from __future__ import annotations

import torch
from torch import nn

from zoo.kernels import rms_norm


class RMSNorm(nn.Module):
    """weight * x / rms(x), computed in float32 as Llama computes it. x: (..., dim)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def build_norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "rms":
        return RMSNorm(dim, eps)
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"norm={kind!r} is not one of ('rms', 'layer')")
