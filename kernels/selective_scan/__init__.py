"""`selective_scan`: Mamba's selective state-space scan (Gu & Dao 2023), mamba_ssm's semantics.

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t,   y_t = (C_t . h_t + D * u_t) * silu(z_t)

per channel d (state (N,) per channel), with dt = softplus(delta + delta_bias) when asked. See
`reference.py` for the definition, `torch_chunked.py` for the CPU path and `triton_kernels.py`
for the kernels.
"""

from __future__ import annotations

import torch

from ..backend import OpBackends, resolve_backend
from .recurrent import selective_scan_recurrent
from .reference import selective_scan_reference
from .torch_chunked import selective_scan_chunked

OP_BACKENDS = OpBackends("selective_scan")


def selective_scan(
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
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mamba's selective scan over time, channels first as mamba_ssm lays it out.

    Args:
        u: (B, D, T) inputs (D channels; mamba's d_inner).
        delta: (B, D, T) time steps before `delta_bias` and softplus.
        A: (D, N) state matrix (diagonal per channel); negative for a decaying state.
        B, C: (B, N, T), shared by all channels, or (B, G, N, T): channel d uses group
            d // (D // G).
        D: optional (D,) skip connection, y += D * u.
        z: optional (B, D, T) gate, y *= silu(z).
        delta_bias: optional (D,), added to delta.
        delta_softplus: apply softplus to delta (+ bias).
        initial_state: optional (B, D, N), the state before the first step.
        output_final_state: also return the state after the last step.
        backend: "auto" (Triton on CUDA, PyTorch otherwise), "torch" (the recurrence for one
            step, chunks otherwise), "triton" or "reference".
    Returns:
        (y, final_state): y (B, D, T) in u's dtype; final_state (B, D, N) in float32 (float64
        for float64 inputs) or None.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    backend = resolve_backend(backend, u, OP_BACKENDS)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, output_final_state)
    if backend == "reference":
        return selective_scan_reference(*args)
    if backend == "torch" and u.shape[-1] == 1:  # one step (decoding): the recurrence itself
        return selective_scan_recurrent(*args)
    if backend == "torch":
        return selective_scan_chunked(*args)
    from .triton_kernels import selective_scan_triton

    return selective_scan_triton(*args)


def _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state) -> None:
    op = "selective_scan"
    if u.dim() != 3:
        raise ValueError(f"{op}: u must be (B, D, T), got shape {tuple(u.shape)}")
    batch, dim, T = u.shape
    if T < 1:
        raise ValueError(f"{op}: u has T = 0 steps; pass at least one")
    if tuple(delta.shape) != (batch, dim, T):
        raise ValueError(f"{op}: delta must match u's shape {(batch, dim, T)}, "
                         f"got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"{op}: A must be (D={dim}, N), got {tuple(A.shape)}")
    N = A.shape[1]
    for name, BC in (("B", B), ("C", C)):
        if BC.dim() == 3 and tuple(BC.shape) == (batch, N, T):
            continue
        if BC.dim() == 4 and (BC.shape[0], BC.shape[2], BC.shape[3]) == (batch, N, T):
            G = BC.shape[1]
            if G < 1 or dim % G:
                raise ValueError(f"{op}: {name} has G={G} groups, which must divide D={dim}")
            continue
        raise ValueError(f"{op}: {name} must be (B, N, T) = {(batch, N, T)} or (B, G, N, T) = "
                         f"({batch}, G, {N}, {T}), got {tuple(BC.shape)}")
    if B.dim() != C.dim() or (B.dim() == 4 and B.shape[1] != C.shape[1]):
        raise ValueError(f"{op}: B and C must have the same groups, got {tuple(B.shape)} and "
                         f"{tuple(C.shape)}")
    for name, vec in (("D", D), ("delta_bias", delta_bias)):
        if vec is not None and tuple(vec.shape) != (dim,):
            raise ValueError(f"{op}: {name} must be (D,) = ({dim},), got {tuple(vec.shape)}")
    if z is not None and tuple(z.shape) != (batch, dim, T):
        raise ValueError(f"{op}: z must match u's shape {(batch, dim, T)}, got {tuple(z.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (batch, dim, N):
        raise ValueError(f"{op}: initial_state must be (B, D, N) = {(batch, dim, N)}, "
                         f"got {tuple(initial_state.shape)}")


__all__ = [
    "selective_scan", "selective_scan_chunked", "selective_scan_recurrent",
    "selective_scan_reference",
]
