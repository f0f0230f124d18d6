"""Linformer (Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity"), the
paper's bidirectional self-attention for encoders and classification heads.

Keys and values are projected along the sequence, K' = E K and V' = F V with E, F of shape
(k_slots, max_seq_len), and every query attends softmax-wise over the k projected slots. Each
slot mixes every position, the future included, so it is a plain module, not a registered
mixer: the causal mixer registered as `linformer` is the ABC-style bounded-memory form in
`zoo.layers.bounded_memory`, which says why it holds that key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .linear import Linear


class LinformerSelfAttention(nn.Module):
    """The paper's bidirectional Linformer self-attention (Wang et al. 2020, eq. 7).

    x: (B, T, d_model) with T <= max_seq_len -> (B, T, d_model). Keys and values (B, T, H, D)
    are projected along the sequence by E, F (k_slots, max_seq_len), the first T columns for a
    shorter input, to (B, k_slots, H, D); each query attends over the k_slots projected positions.
    `share_kv` uses E for both (the paper's key-value sharing); `key_padding_mask` (B, T), True
    for real tokens, zeroes padded keys and values before the projection. Every output depends on
    every input position: not causal, no state.
    """

    def __init__(
        self,
        d_model: int,
        *,
        n_heads: int = 4,
        max_seq_len: int = 512,
        k_slots: int = 64,
        share_kv: bool = False,
        bias: bool = True,
    ):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(
                f"LinformerSelfAttention: d_model={d_model} is not divisible by "
                f"n_heads={n_heads}"
            )
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.max_seq_len, self.k_slots = max_seq_len, k_slots
        self.q_proj = Linear(d_model, d_model, bias=bias)
        self.k_proj = Linear(d_model, d_model, bias=bias)
        self.v_proj = Linear(d_model, d_model, bias=bias)
        self.o_proj = Linear(d_model, d_model, bias=bias)
        # std 1 / sqrt(n): a projected slot then has the scale of one key, whatever n is
        self.E = nn.Parameter(torch.randn(k_slots, max_seq_len) * max_seq_len ** -0.5)
        self.F = None if share_kv else nn.Parameter(
            torch.randn(k_slots, max_seq_len) * max_seq_len ** -0.5
        )

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"LinformerSelfAttention: x must be (B, T, d_model={self.d_model}), "
                f"got {tuple(x.shape)}"
            )
        seq_len = x.shape[1]
        if seq_len > self.max_seq_len:
            raise ValueError(
                f"LinformerSelfAttention: sequence length {seq_len} > "
                f"max_seq_len={self.max_seq_len}; "
                "E and F project a fixed number of positions"
            )
        split = "b t (h d) -> b t h d"
        q = rearrange(self.q_proj(x), split, h=self.n_heads)
        k = rearrange(self.k_proj(x), split, h=self.n_heads)
        v = rearrange(self.v_proj(x), split, h=self.n_heads)
        if key_padding_mask is not None:
            keep = key_padding_mask[:, :, None, None].to(k.dtype)
            k, v = k * keep, v * keep
        E = self.E[:, :seq_len]
        F_ = E if self.F is None else self.F[:, :seq_len]
        k_slots = torch.einsum("nt,bthd->bhnd", E, k)
        v_slots = torch.einsum("nt,bthd->bhnd", F_, v)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k_slots, v_slots)
        return self.o_proj(rearrange(out, "b h t d -> b t (h d)"))
