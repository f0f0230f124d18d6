"""Mamba's selective scan, written for clarity as the sequential recurrence: the oracle.

Per channel d and state index n (Gu & Dao 2023, Algorithm 2, zero-order-hold on A, Euler on B):

    dt_t = softplus(delta_t + delta_bias)            (when delta_softplus)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t
    y_t  = (C_t . h_t + D * u_t) * silu(z_t)          (the D and z terms when given)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..precision import compute_dtype


def expand_groups(BC: torch.Tensor, D: int) -> torch.Tensor:
    """(B, N, T) or (B, G, N, T) -> (B, D, N, T): channel d reads group d // (D // G)."""
    if BC.dim() == 3:
        return BC[:, None].expand(-1, D, -1, -1)
    return BC.repeat_interleave(D // BC.shape[1], dim=1)


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The recurrence above, one step at a time.

    u, delta, z: (B, D, T); A: (D, N); B, C: (B, N, T) or (B, G, N, T); D, delta_bias: (D,);
    initial_state: (B, D, N). Returns y (B, D, T) in u's dtype and, when asked, the state after
    the last step (B, D, N) in float32 (float64 for float64 inputs).
    """
    dtype = compute_dtype(u.dtype)
    batch, dim, T = u.shape
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    uf, Af = u.to(dtype), A.to(dtype)
    Bf, Cf = expand_groups(B.to(dtype), dim), expand_groups(C.to(dtype), dim)
    h = (initial_state.to(dtype) if initial_state is not None
         else u.new_zeros(batch, dim, A.shape[1], dtype=dtype))
    ys = []
    for t in range(T):
        decay = torch.exp(dt[:, :, t, None] * Af)
        h = decay * h + (dt[:, :, t] * uf[:, :, t])[..., None] * Bf[..., t]
        ys.append((h * Cf[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(dtype)[:, None] * uf
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(u.dtype), (h if output_final_state else None)
