"""The generalized delta rule's one-token form, for decoding, without forming the (K, K)
transition:

    r = a_t^T S_{t-1};   S_t = exp(g_t) S_{t-1} + b_t r^T + k_t v_t^T;   o_t = S_t^T (scale q_t)
"""

from __future__ import annotations

import torch

from ..linear_attention.torch_chunked import log_decay_floor
from ..precision import compute_dtype


def generalized_delta_rule_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    decay: torch.Tensor | None = None,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`generalized_delta_rule_reference`'s contract for one token.

    q, k, a, b: (B, 1, H, K); v: (B, 1, H, V); decay: None, (B, 1, H) or (B, 1, H, K);
    initial_state: (B, H, K, V). Returns o (B, 1, H, V) in q's dtype and the state after the
    token (B, H, K, V) in float32 (float64 for float64 inputs) when asked.
    """
    B, T, H, K = q.shape
    if T != 1:
        raise ValueError(f"generalized_delta_rule_recurrent: takes one token (T = 1), got "
                         f"T = {T}; generalized_delta_rule runs longer inputs in chunks")
    dtype = compute_dtype(q.dtype)
    q_t, k_t, v_t = scale * q[:, 0].to(dtype), k[:, 0].to(dtype), v[:, 0].to(dtype)
    a_t, b_t = a[:, 0].to(dtype), b[:, 0].to(dtype)
    state = (initial_state.to(dtype) if initial_state is not None
             else q_t.new_zeros(B, H, K, v.shape[-1]))
    read = torch.einsum("bhk,bhkv->bhv", a_t, state)
    if decay is not None:
        # the chunked form's floor, so that every form gives the same numbers for g = -inf
        gate = torch.exp(decay[:, 0].to(dtype).clamp(min=log_decay_floor(dtype)))
        state = state * (gate[..., None, None] if gate.dim() == 2 else gate.unsqueeze(-1))
    state = (state + b_t.unsqueeze(-1) * read.unsqueeze(-2)
             + k_t.unsqueeze(-1) * v_t.unsqueeze(-2))
    o = torch.einsum("bhk,bhkv->bhv", q_t, state).unsqueeze(1).to(q.dtype)
    return o, (state if output_final_state else None)
