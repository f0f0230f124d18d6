"""The generalized delta rule (diagonal plus low rank, fla's "dplr") as a token-by-token
recurrence, written for clarity: the oracle.

The state S is (K, V) per batch and head, read by o_t = S_t^T (scale q_t), and

    S_t = (Diag(exp(g_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T

with `a` the vector that reads the old state (a_t^T S_{t-1}) and `b` the direction the reading
is written back along, both acting on the undecayed S_{t-1}, as fla's dplr naming has it:
RWKV-7 is a = -kappa_hat, b = kappa_hat * iclr (kappa_hat the unit "removal key", iclr its
in-context learning rate), making the transition Diag(w_t) - (kappa_hat * iclr) kappa_hat^T,
the transpose of RWKV-7's (V, K) state update S (Diag(w) - kappa_hat^T (iclr * kappa_hat)).
The delta rule is the case b = k, a = -beta A_t k (A_t the gate), v -> beta v.
"""

from __future__ import annotations

import torch

from ..precision import compute_dtype


def generalized_delta_rule_reference(
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
    """The recurrence above, one token at a time as matrix products, in float32 (float64 for
    float64 inputs).

    q, k, a, b: (B, T, H, K); v: (B, T, H, V); decay: None, (B, T, H) or (B, T, H, K) log-decay;
    initial_state: (B, H, K, V). Returns o (B, T, H, V) in q's dtype and, when asked, the final
    state (B, H, K, V) in the compute dtype.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype = q.dtype
    dtype = compute_dtype(q.dtype)
    q, k, v, a, b = scale * q.to(dtype), k.to(dtype), v.to(dtype), a.to(dtype), b.to(dtype)
    g = decay.to(dtype) if decay is not None else None
    identity = torch.eye(K, dtype=dtype, device=q.device)

    state = (initial_state.to(dtype) if initial_state is not None
             else q.new_zeros(B, H, K, V))
    outputs = []
    for t in range(T):
        if g is None:
            diagonal = identity
        elif g.dim() == 3:
            diagonal = torch.exp(g[:, t])[..., None, None] * identity
        else:
            diagonal = torch.diag_embed(torch.exp(g[:, t]))
        transition = diagonal + b[:, t].unsqueeze(-1) @ a[:, t].unsqueeze(-2)  # (B, H, K, K)
        state = transition @ state + k[:, t].unsqueeze(-1) @ v[:, t].unsqueeze(-2)
        outputs.append((state.transpose(-1, -2) @ q[:, t].unsqueeze(-1)).squeeze(-1))

    o = torch.stack(outputs, dim=1).to(out_dtype)
    return o, (state if output_final_state else None)
