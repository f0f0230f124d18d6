"""The state of `window_linear_attention` and how a chunk of new tokens joins it.

The state after a token holds the last W tokens' keys, values and key features (the window the
next query's softmax part may read) and the linear memory S, z of every token that has left
it. A chunk of T new tokens is laid out after the window as one context of W + T tokens,
context index i = token position + W - (tokens before the chunk): the chunk's token t sits at
W + t, its window is the context slice (t, W + t], and the token at context index t is the one
that leaves the window when query t arrives. Unfilled window slots (fewer than W tokens of
history) come first and are zeroed, so no path has to special-case them beyond masking.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..precision import compute_dtype


class WindowLinearAttentionState(NamedTuple):
    """The state after the last token, per batch row and head (H as the op's q).

    k: (B, W, H, D) keys of the last W tokens, oldest first, in k's dtype.
    v: (B, W, H, Dv) their values, in v's dtype.
    phi_k: (B, W, H, F) their key features, in phi_k's dtype.
    S: (B, H, F, Dv) sum of phi_k_j v_j^T over every token that has left the window, float32
        (float64 for float64 inputs).
    z: (B, H, F) sum of phi_k_j over the same tokens, same dtype as S.
    filled: how many of the W slots hold tokens (min(tokens seen, W), one count for the whole
        batch); the first W - filled slots are empty and ignored.
    """

    k: torch.Tensor
    v: torch.Tensor
    phi_k: torch.Tensor
    S: torch.Tensor
    z: torch.Tensor
    filled: int


def empty_state(
    batch_size: int, window: int, heads: int, key_dim: int, value_dim: int, feature_dim: int,
    *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
    memory_dtype: torch.dtype | None = None,
) -> WindowLinearAttentionState:
    """The state before any token: zero tensors, filled = 0. The window tensors are `dtype`,
    S and z `memory_dtype` (default: float64 for float64, float32 otherwise)."""
    B, W, H = batch_size, window, heads
    memory_dtype = memory_dtype or compute_dtype(dtype)
    window_zeros = lambda dim: torch.zeros(B, W, H, dim, device=device, dtype=dtype)
    return WindowLinearAttentionState(
        k=window_zeros(key_dim), v=window_zeros(value_dim), phi_k=window_zeros(feature_dim),
        S=torch.zeros(B, H, feature_dim, value_dim, device=device, dtype=memory_dtype),
        z=torch.zeros(B, H, feature_dim, device=device, dtype=memory_dtype), filled=0,
    )


class Context(NamedTuple):
    """A chunk laid out after its window (see the module docstring), all in one compute dtype.

    k, v, phi_k: (B, W + T, H, ·); S, z: the memory before the chunk, None when empty;
    start: the first context index that holds a token (W - filled).
    """

    k: torch.Tensor
    v: torch.Tensor
    phi_k: torch.Tensor
    S: torch.Tensor | None
    z: torch.Tensor | None
    start: int


def window_context(
    k: torch.Tensor, v: torch.Tensor, phi_k: torch.Tensor,
    state: WindowLinearAttentionState | None, window: int, dtype: torch.dtype,
) -> Context:
    """k (B, T, H, D), v (B, T, H, Dv), phi_k (B, T, H, F) after the state's window, in dtype."""
    W = window
    if state is None:
        prefix = [x.new_zeros(x.shape[0], W, *x.shape[2:], dtype=dtype) for x in (k, v, phi_k)]
        S = z = None
        filled = 0
    else:
        filled = state.filled
        prefix = [_drop_empty_slots(x.to(dtype), W - filled)
                  for x in (state.k, state.v, state.phi_k)]
        S, z = state.S.to(dtype), state.z.to(dtype)
    chunk = (k.to(dtype), v.to(dtype), phi_k.to(dtype))
    kx, vx, fx = (torch.cat([before, new], dim=1) for before, new in zip(prefix, chunk))
    return Context(kx, vx, fx, S, z, W - filled)


def _drop_empty_slots(x: torch.Tensor, empty: int) -> torch.Tensor:
    """Zero the first `empty` slots, so whatever a caller left there reaches no output."""
    if empty == 0:
        return x
    return torch.cat([torch.zeros_like(x[:, :empty]), x[:, empty:]], dim=1)


def next_state(
    context: Context, S: torch.Tensor, z: torch.Tensor, T: int, window: int,
    k: torch.Tensor, v: torch.Tensor, phi_k: torch.Tensor, memory_dtype: torch.dtype,
) -> WindowLinearAttentionState:
    """The state after the chunk: the context's last W tokens, in the dtypes of the chunk's
    k, v, phi_k, and S, z (already advanced) in memory_dtype.

    Every tensor is a fresh contiguous copy: a view would keep the whole context (or the
    memory with its ones column) alive for as long as the state lives.
    """
    own = lambda x, like: x.to(dtype=like.dtype, memory_format=torch.contiguous_format,
                               copy=True)
    filled = min(window - context.start + T, window)
    return WindowLinearAttentionState(
        k=own(context.k[:, T:], k), v=own(context.v[:, T:], v),
        phi_k=own(context.phi_k[:, T:], phi_k),
        S=S.to(dtype=memory_dtype, memory_format=torch.contiguous_format, copy=True),
        z=z.to(dtype=memory_dtype, memory_format=torch.contiguous_format, copy=True),
        filled=filled,
    )
