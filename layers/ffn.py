"""Dense feed-forward layers: the GELU MLP and SwiGLU (Llama's)."""

from __future__ import annotations

import torch.nn.functional as F

from .base import FFN
from .linear import Linear
from .registry import register_ffn


def swiglu_hidden_size(d_model: int, multiple_of: int = 64) -> int:
    """Llama's choice: 2/3 of 4 * d_model, rounded up to a multiple."""
    hidden = int(8 * d_model / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@register_ffn("mlp")
class MLP(FFN):
    """fc_out(gelu(fc_in(x))). x: (B, T, d_model)."""

    def __init__(self, d_model: int, *, hidden_size: int | None = None, bias: bool = True):
        super().__init__(d_model)
        hidden_size = hidden_size or 4 * d_model
        self.fc_in = Linear(d_model, hidden_size, bias=bias)
        self.fc_out = Linear(hidden_size, d_model, bias=bias)

    def forward(self, x, state=None, padding_mask=None):
        # position-wise and stateless: a padded position's output is never read
        return self.fc_out(F.gelu(self.fc_in(x))), None


@register_ffn("swiglu")
class SwiGLU(FFN):
    """down_proj(silu(gate_proj(x)) * up_proj(x)), named as in Llama. x: (B, T, d_model)."""

    def __init__(self, d_model: int, *, hidden_size: int | None = None, bias: bool = False):
        super().__init__(d_model)
        hidden_size = hidden_size or swiglu_hidden_size(d_model)
        self.gate_proj = Linear(d_model, hidden_size, bias=bias)
        self.up_proj = Linear(d_model, hidden_size, bias=bias)
        self.down_proj = Linear(hidden_size, d_model, bias=bias)

    def forward(self, x, state=None, padding_mask=None):
        # position-wise and stateless: a padded position's output is never read
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)), None
