"""The one-step form, for decoding: the recurrence of `reference.py` taken once,

    h = exp(dt * A) * h_prev + dt * B * u,   y = (C . h + D * u) * silu(z)

in autograd-visible ops: at T = 1 there is nothing for the chunked form's set-up to share.
"""

from __future__ import annotations

import torch

from ..precision import compute_dtype
from .reference import expand_groups
from .torch_chunked import skip_and_gate, time_steps


def selective_scan_recurrent(
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
    """`selective_scan_reference`'s contract for one step.

    u, delta, z: (B, D, 1); A: (D, N); B, C: (B, N, 1) or (B, G, N, 1); D, delta_bias: (D,);
    initial_state: (B, D, N). Returns y (B, D, 1) in u's dtype and, when asked, the state after
    the step (B, D, N) in float32 (float64 for float64 inputs).
    """
    batch, dim, T = u.shape
    if T != 1:
        raise ValueError(f"selective_scan_recurrent: takes one step (T = 1), got T = {T}; "
                         "selective_scan runs longer inputs in chunks")
    dtype = compute_dtype(u.dtype)
    dt = time_steps(delta, delta_bias, delta_softplus, dtype)  # (B, D, 1)
    uf = u.to(dtype)
    Bd = expand_groups(B.to(dtype), dim)[..., 0]  # (B, D, N)
    Cd = expand_groups(C.to(dtype), dim)[..., 0]
    # zeros rather than a skip of the decay term, so that A still gets its (zero) gradient
    h0 = initial_state.to(dtype) if initial_state is not None else uf.new_zeros(Bd.shape)
    state = torch.exp(dt * A.to(dtype)) * h0 + (dt * uf) * Bd
    y = (state * Cd).sum(-1, keepdim=True)
    return skip_and_gate(y, uf, D, z).to(u.dtype), (state if output_final_state else None)
