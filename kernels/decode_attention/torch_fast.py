"""The PyTorch path of decode_attention: two products and a softmax, grouped query heads
sharing their KV head without copying it."""

from __future__ import annotations

import torch


def decode_attention_torch(
    q: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor, scale: float
) -> torch.Tensor:
    """q: (B, H, D); keys_t: (B, H_kv, D, L); values: (B, H_kv, L, D) -> (B, H, D).

    The scores are one product over the transposed keys' contiguous rows. The values' weighted
    sum is a product too in eager mode; inside torch.compile it is a broadcast sum, which
    inductor fuses with the softmax into one pass over the values where a BLAS call would stay
    a separate read.
    """
    B, H, D = q.shape
    H_kv = keys_t.shape[1]
    q = q.reshape(B, H_kv, H // H_kv, D) * scale
    scores = torch.matmul(q, keys_t)  # (B, H_kv, G, L)
    # the softmax in at least float32 (bf16 scores would round the weights)
    wide = torch.promote_types(scores.dtype, torch.float32)
    weights = scores.to(wide).softmax(dim=-1)
    if torch.compiler.is_compiling():
        out = (weights[..., None] * values[:, :, None]).sum(dim=-2).to(values.dtype)
    else:
        out = torch.matmul(weights.to(values.dtype), values)  # (B, H_kv, G, D)
    return out.reshape(B, H, D)
