"""The delta rule as a token-by-token recurrence, written for clarity: the oracle.

The state S is (K, V) per batch and head (fla's layout), read by o_t = S_t^T (scale q_t), and

    S_t = (I - beta_t k_t k_t^T) A_t S_{t-1} + beta_t k_t v_t^T

with the gate A_t applied to the old state first and the delta correction made against the
decayed state:
    no decay:          A_t = I                      (DeltaNet, Yang et al. 2024)
    decay (B, T, H):   A_t = exp(g_t) I             (Gated DeltaNet; Qwen3-Next's linear layers)
    decay (B, T, H, K): A_t = Diag(exp(g_t))        (Kimi Delta Attention, KDA)
A scalar gate commutes with (I - beta k k^T), so for DeltaNet and Gated DeltaNet the order is
immaterial and this equals A_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T; for KDA it is
not, and decaying first is what Kimi-Linear and fla's KDA compute (S = S * exp(g); then the
prediction k^T S, the error and the rank-one write are made on that decayed S), as do fla's
gated delta rule and transformers' Qwen3-Next torch recurrence for the scalar gate.
"""

from __future__ import annotations

import torch

from ..precision import compute_dtype


def delta_rule_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    decay: torch.Tensor | None = None,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The recurrence above, one token at a time as matrix products, in float32 (float64 for
    float64 inputs).

    q, k: (B, T, H, K); v: (B, T, H, V); beta: (B, T, H); decay: None, (B, T, H) or (B, T, H, K)
    log-decay; initial_state: (B, H, K, V). Returns o (B, T, H, V) in q's dtype and, when
    asked, the final state (B, H, K, V) in the compute dtype.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype = q.dtype
    dtype = compute_dtype(q.dtype)
    q, k, v, beta = scale * q.to(dtype), k.to(dtype), v.to(dtype), beta.to(dtype)
    g = decay.to(dtype) if decay is not None else None
    identity = torch.eye(K, dtype=dtype, device=q.device)

    state = (initial_state.to(dtype) if initial_state is not None
             else q.new_zeros(B, H, K, V))
    outputs = []
    for t in range(T):
        k_t, v_t, beta_t = k[:, t], v[:, t], beta[:, t, :, None, None]  # (B, H, K), (B, H, V)
        if g is None:
            gated = state
        elif g.dim() == 3:
            gated = torch.exp(g[:, t])[..., None, None] * state
        else:
            gated = torch.diag_embed(torch.exp(g[:, t])) @ state
        transition = identity - beta_t * (k_t.unsqueeze(-1) @ k_t.unsqueeze(-2))  # (B, H, K, K)
        state = transition @ gated + beta_t * (k_t.unsqueeze(-1) @ v_t.unsqueeze(-2))
        outputs.append((state.transpose(-1, -2) @ q[:, t].unsqueeze(-1)).squeeze(-1))

    o = torch.stack(outputs, dim=1).to(out_dtype)
    return o, (state if output_final_state else None)
