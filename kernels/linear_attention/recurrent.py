"""The one-token form, for decoding: the recurrence of `reference.py` taken once.

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,   o_t = (scale q_t)^T S_t

(with `bonus`, o_t = (scale q_t)^T S_{t-1} + scale (q_t . (u * k_t)) v_t). At T = 1 this is
the cheapest form: no chunk set-up, one outer product and one read of the state.
"""

from __future__ import annotations

import torch

from ..precision import compute_dtype
from .reference import expand_log_decay
from .torch_chunked import _bonus_term, log_decay_floor


def linear_attention_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor | None = None,
    bonus: torch.Tensor | None = None,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    output_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`linear_attention_chunked`'s contract for one token (it has no chunks to size).

    q, k: (B, 1, H, K); v: (B, 1, H, V); decay: None, (H,), (B, 1, H) or (B, 1, H, K);
    bonus: (H, K) or None; initial_state: (B, H, K, V). Returns o (B, 1, H, V) in
    `output_dtype` (default q's) and the state after the token (B, H, K, V) in float32 (float64
    for float64 inputs) when asked.
    """
    B, T, H, K = q.shape
    if T != 1:
        raise ValueError(f"linear_attention_recurrent: takes one token (T = 1), got T = {T}; "
                         "linear_attention runs longer inputs in chunks")
    dtype = compute_dtype(q.dtype)
    g = expand_log_decay(decay, B, T, H, K, dtype)
    if g is not None:  # the chunked form's floor, so that both forms give the same numbers
        g = g.clamp(min=log_decay_floor(dtype))
    q_t, k_t, v_t = (scale * q[:, 0].to(dtype)), k[:, 0].to(dtype), v[:, 0].to(dtype)
    state = (initial_state.to(dtype) if initial_state is not None
             else q_t.new_zeros(B, H, K, v.shape[-1]))
    new_state = state if g is None else torch.exp(g[:, 0]).unsqueeze(-1) * state
    new_state = new_state + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
    if bonus is not None:  # the state before the token, and the token through the bonus
        o = torch.einsum("bhk,bhkv->bhv", q_t, state)
        o = o + _bonus_term(q[:, 0], k[:, 0], v[:, 0], bonus, scale, dtype)
    else:
        o = torch.einsum("bhk,bhkv->bhv", q_t, new_state)
    o = o.unsqueeze(1).to(output_dtype or q.dtype)
    return o, (new_state if output_final_state else None)
