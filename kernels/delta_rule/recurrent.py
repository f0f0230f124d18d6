"""The one-token form, for decoding: the recurrence of `reference.py` taken once, without
forming the (K, K) transition:

    S' = A_t S_{t-1};   S_t = S' + k_t (beta_t (v_t - S'^T k_t))^T;   o_t = S_t^T (scale q_t)
"""

from __future__ import annotations

import torch

from ..linear_attention.torch_chunked import log_decay_floor
from ..precision import compute_dtype


def delta_rule_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    decay: torch.Tensor | None = None,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`delta_rule_reference`'s contract for one token.

    q, k: (B, 1, H, K); v: (B, 1, H, V); beta: (B, 1, H); decay: None, (B, 1, H) or
    (B, 1, H, K); initial_state: (B, H, K, V). Returns o (B, 1, H, V) in q's dtype and the state
    after the token (B, H, K, V) in float32 (float64 for float64 inputs) when asked.
    """
    B, T, H, K = q.shape
    if T != 1:
        raise ValueError(f"delta_rule_recurrent: takes one token (T = 1), got T = {T}; "
                         "delta_rule runs longer inputs in chunks")
    dtype = compute_dtype(q.dtype)
    q_t, k_t, v_t = scale * q[:, 0].to(dtype), k[:, 0].to(dtype), v[:, 0].to(dtype)
    beta_t = beta[:, 0].to(dtype).unsqueeze(-1)  # (B, H, 1)
    state = (initial_state.to(dtype) if initial_state is not None
             else q_t.new_zeros(B, H, K, v.shape[-1]))
    if decay is not None:
        # the chunked form's floor, so that every form gives the same numbers for g = -inf
        gate = torch.exp(decay[:, 0].to(dtype).clamp(min=log_decay_floor(dtype)))
        state = state * (gate[..., None, None] if gate.dim() == 2 else gate.unsqueeze(-1))
    predicted = torch.einsum("bhk,bhkv->bhv", k_t, state)
    state = state + k_t.unsqueeze(-1) * (beta_t * (v_t - predicted)).unsqueeze(-2)
    o = torch.einsum("bhk,bhkv->bhv", q_t, state).unsqueeze(1).to(q.dtype)
    return o, (state if output_final_state else None)
