"""One query per head against a KV cache, written for clarity: the oracle of decode_attention."""

from __future__ import annotations

import torch

from ..precision import compute_dtype


def decode_attention_reference(
    q: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale) v per query head, in float32 (float64 stays float64).

    q: (B, H, D); keys_t: (B, H_kv, D, L), keys transposed; values: (B, H_kv, L, D).
    Query head h reads KV head h // (H // H_kv). Returns (B, H, D) in q's dtype.
    """
    compute = compute_dtype(q.dtype)
    groups = q.shape[1] // keys_t.shape[1]
    keys = keys_t.transpose(2, 3).repeat_interleave(groups, dim=1).to(compute)  # (B, H, L, D)
    values = values.repeat_interleave(groups, dim=1).to(compute)
    scores = torch.einsum("bhd,bhld->bhl", q.to(compute), keys) * scale
    weights = scores.softmax(dim=-1)
    return torch.einsum("bhl,bhld->bhd", weights, values).to(q.dtype)
