"""`wkv4`: RWKV-4's time-mixing recurrence (WKV) with a carried, overflow-free state.

Per channel c, with per-step decay exp(-exp(w_c)) (transformers' RWKV convention: `time_decay`
is w) and bonus u_c (`time_first`) for the current token:

    y_t = (sum_{i<t} e^{-(t-1-i) e^w + k_i} v_i + e^{u + k_t} v_t)
        / (sum_{i<t} e^{-(t-1-i) e^w + k_i}     + e^{u + k_t})

State layout: one tensor (B, 3, C) holding rows (num, den, max); the real numerator and
denominator are num * e^max and den * e^max. This is the layout of transformers' kernel state
(B, C, 3) with the 3 moved forward so each row is contiguous over channels. The empty state is
(0, 0, -1e38) (`empty_wkv4_state`). The state is float32 (float64 for float64 inputs on the
reference and torch backends) whatever the input dtype, as in transformers.
"""

from __future__ import annotations

import torch

from ..backend import OpBackends, resolve_backend
from .recurrent import wkv4_recurrent
from .reference import EMPTY_MAX, empty_wkv4_state, state_dtype, wkv4_reference
from .torch_chunked import wkv4_torch

OP_BACKENDS = OpBackends("wkv4")


def wkv4(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RWKV-4's WKV over a sequence, from an optional carried state.

    Args:
        w: (C,) time_decay; the per-step decay is exp(-exp(w)).
        u: (C,) time_first, the bonus of the current token.
        k, v: (B, T, C) keys and values.
        initial_state: optional (B, 3, C) rows (num, den, max), as returned before.
        output_final_state: also return the state after the last token, (B, 3, C).
        backend: "auto" (Triton on CUDA, PyTorch otherwise), "torch" (the recurrent step for
            one token, chunks otherwise), "triton" or "reference".
    Returns:
        (y, final_state): y (B, T, C) in v's dtype; final_state or None.
    """
    if k.dim() != 3:
        raise ValueError(f"wkv4: k must be (B, T, C), got shape {tuple(k.shape)}")
    B, T, C = k.shape
    if v.shape != k.shape:
        raise ValueError(f"wkv4: v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    for name, t in (("w", w), ("u", u)):
        if t.shape != (C,):
            raise ValueError(f"wkv4: {name} must be (C,) = ({C},), got {tuple(t.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (B, 3, C):
        raise ValueError(
            f"wkv4: initial_state must be (B, 3, C) = {(B, 3, C)} rows (num, den, max), "
            f"got {tuple(initial_state.shape)}"
        )
    backend = resolve_backend(backend, k, OP_BACKENDS)
    if backend == "reference":
        return wkv4_reference(w, u, k, v, initial_state, output_final_state)
    if backend == "torch" and T == 1:  # one token (decoding): the recurrent step is cheapest
        return wkv4_recurrent(w, u, k, v, initial_state, output_final_state)
    if backend == "torch":
        return wkv4_torch(w, u, k, v, initial_state, output_final_state)
    from .triton_kernels import wkv4_triton

    return wkv4_triton(w, u, k, v, initial_state, output_final_state)


__all__ = [
    "EMPTY_MAX", "empty_wkv4_state", "state_dtype", "wkv4", "wkv4_recurrent", "wkv4_reference",
    "wkv4_torch",
]
