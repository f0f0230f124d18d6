"""Rotary position embeddings, computed exactly as transformers' Llama computes them.

Layout (B, T, H, D); the rotation pairs dimension i with i + D/2 ("rotate_half").
"""

from __future__ import annotations

import torch
from torch import nn

from .base import at_least_float32


class Rotary(nn.Module):
    """The frequencies `inv_freq` (head_dim / 2,) stay float32 when the model is cast to bf16 or
    fp16: bf16 rounds them by up to 0.37%, which turns the rotation at position 4096 by up to
    1.8 radians (head_dim 64; 5.0 at 128)."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim
        return 1.0 / (self.theta**exponents)

    def _apply(self, fn, recurse=True):
        return super()._apply(at_least_float32(fn), recurse)

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the frequencies (from_pretrained materialises non-persistent buffers empty)."""
        if self.inv_freq.is_meta:  # built on the meta device and loaded with assign=True
            self.inv_freq = self._inv_freq()
        else:
            self.inv_freq.copy_(self._inv_freq().to(self.inv_freq.device))

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
