"""Rotary position embeddings, computed exactly as transformers' Llama computes them.

Layout (B, T, H, D); the rotation pairs dimension i with i + D/2 ("rotate_half").
"""

from __future__ import annotations

import torch
from torch import nn


class Rotary(nn.Module):
    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, start: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """cos and sin for positions start .. start + length - 1, shaped (1, T, 1, D)."""
        positions = torch.arange(start, start + length, device=self.inv_freq.device)
        freqs = positions[:, None].float() * self.inv_freq.float()
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype)[None, :, None, :], emb.sin().to(dtype)[None, :, None, :]

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin
