"""Linear attention as a token-by-token recurrence, written for clarity: the oracle.

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T            (state (K, V) per batch and head)
    o_t = (scale q_t)^T S_t                              (inclusive of token t)

With `bonus` u (RWKV-6's "time_first") the state is read before token t is added and token t
contributes through u instead: o_t = (scale q_t)^T S_{t-1} + scale (q_t . (u * k_t)) v_t.
With `normalize`, z_t (the same recurrence with v = 1) divides: o_t = num_t / (scale q_t . z_t
+ eps); the state then carries z as a last column, (K, V + 1).
"""

from __future__ import annotations

import torch

from ..precision import compute_dtype

NORMALIZE_EPS = 1e-6


def expand_log_decay(decay: torch.Tensor | None, B: int, T: int, H: int, K: int,
                     dtype: torch.dtype) -> torch.Tensor | None:
    """Any accepted decay form -> (B, T, H, 1) or (B, T, H, K) log-decay in `dtype` (a view)."""
    if decay is None:
        return None
    decay = decay.to(dtype)
    if decay.dim() == 1:  # (H,): one constant per head (RetNet's log gamma)
        return decay.view(1, 1, H, 1).expand(B, T, H, 1)
    if decay.dim() == 3:  # (B, T, H): per step and head (Mamba-2, scalar-gated)
        return decay.unsqueeze(-1)
    return decay  # (B, T, H, K): per step, head and key channel (GLA, RWKV-6)


def linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor | None = None,
    bonus: torch.Tensor | None = None,
    scale: float = 1.0,
    normalize: bool = False,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The recurrence above, one token at a time, in float32 (float64 for float64 inputs).

    q, k: (B, T, H, K); v: (B, T, H, V); decay: None, (H,), (B, T, H) or (B, T, H, K) log-decay;
    bonus: (H, K) or None; initial_state: (B, H, K, V), or (B, H, K, V + 1) with `normalize`.
    Returns o (B, T, H, V) in q's dtype and, when asked, the final state in the compute dtype.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype = q.dtype
    dtype = compute_dtype(q.dtype)
    q, k, v = (scale * q.to(dtype)), k.to(dtype), v.to(dtype)
    g = expand_log_decay(decay, B, T, H, K, dtype)
    u = bonus.to(dtype) if bonus is not None else None

    state = q.new_zeros(B, H, K, V)
    z = q.new_zeros(B, H, K)
    if initial_state is not None:
        initial_state = initial_state.to(dtype)
        state = initial_state[..., :V]
        if normalize:
            z = initial_state[..., V]

    outputs = []
    for t in range(T):
        q_t, k_t, v_t = q[:, t], k[:, t], v[:, t]  # (B, H, K), (B, H, K), (B, H, V)
        if u is not None:
            num = torch.einsum("bhk,bhkv->bhv", q_t, state)
            num = num + (q_t * u * k_t).sum(-1, keepdim=True) * v_t
            den = (q_t * z).sum(-1) + (q_t * u * k_t).sum(-1)
        if g is not None:
            gate = torch.exp(g[:, t])  # (B, H, 1) or (B, H, K)
            state = gate.unsqueeze(-1) * state
            z = gate * z
        state = state + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
        z = z + k_t
        if u is None:
            num = torch.einsum("bhk,bhkv->bhv", q_t, state)
            den = (q_t * z).sum(-1)
        outputs.append(num / (den.unsqueeze(-1) + NORMALIZE_EPS) if normalize else num)

    o = torch.stack(outputs, dim=1).to(out_dtype)
    final_state = None
    if output_final_state:
        final_state = torch.cat([state, z.unsqueeze(-1)], -1) if normalize else state
    return o, final_state
