"""The CPU path: no Python loop over time.

The chunk is laid out after the state's window as one context of W + T tokens (state.py). Then:
- the window part is blocked banded attention: queries in blocks of L tokens, each block
  against the L + W - 1 context tokens its windows can reach (its own block and what precedes
  it), masked to the band (t, W + t] and to filled slots; (A, a) unnormalised, m detached;
- the linear part is linear attention over the context delayed by W: query t reads the keys
  and values at context indices <= t (the tokens that have left its window), through zoo's
  `linear_attention` op with the values augmented by a ones column, whose output column is the
  denominator b and whose state carries z beside S.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange

from ..linear_attention import linear_attention
from ..precision import compute_dtype
from .reference import combine, per_head_scale
from .state import Context, WindowLinearAttentionState, next_state, window_context

WindowPart = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def banded_window_attention(
    q: torch.Tensor, kx: torch.Tensor, vx: torch.Tensor, scale: float, window: int, start: int,
    block: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The window part: A (B, T, H, Dv) and a (B, T, H), unnormalised around m (detached).

    q: (B, T, H, D); kx, vx: (B, W + T, H, ·) the context; start: first filled context index.
    Scores take (B, H, T, L + W - 1) memory for L = min(block, T) queries per block.
    """
    B, T, H, D = q.shape
    W = window
    L = min(block, T)
    N = math.ceil(T / L)
    span = L + W - 1
    pad = N * L - T
    q_blocks = rearrange(F.pad(q, (0, 0, 0, 0, 0, pad)), "b (n l) h d -> b h n l d", l=L)
    # block n's queries reach context indices n L + 1 .. n L + L + W - 1: one slab each
    k_slabs = F.pad(kx[:, 1:], (0, 0, 0, 0, 0, pad)).unfold(1, span, L)  # (B, N, H, D, span)
    v_slabs = F.pad(vx[:, 1:], (0, 0, 0, 0, 0, pad)).unfold(1, span, L)
    scores = scale * torch.einsum("bhnld,bnhds->bhnls", q_blocks, k_slabs)
    query = torch.arange(L, device=q.device)[:, None]
    key = torch.arange(span, device=q.device)[None, :]
    band = (key >= query) & (key < query + W)  # context index n L + 1 + key in (t, W + t]
    first_key = torch.arange(N, device=q.device)[:, None] * L + 1
    filled = (first_key + torch.arange(span, device=q.device)) >= start  # (N, span)
    allowed = band & filled[:, None, :]  # (N, L, span); every row holds its own token
    scores = scores.masked_fill(~allowed, -torch.inf)
    m = scores.amax(-1, keepdim=True).detach()
    p = torch.exp(scores - m)
    A = torch.einsum("bhnls,bnhvs->bhnlv", p, v_slabs)
    A = rearrange(A, "b h n l v -> b (n l) h v")[:, :T]
    a = rearrange(p.sum(-1), "b h n l -> b (n l) h")[:, :T]
    return A, a


def linear_part(
    phi_q: torch.Tensor, context: Context, T: int, chunk_size: int, backend: str,
) -> tuple[torch.Tensor, ...]:
    """num (B, T, H, Dv) = phi_q_t . S_{t-W}, den (B, T, H) = phi_q_t . z_{t-W}, and S, z after
    the chunk, from `linear_attention` over the context's first T tokens (delayed by W)."""
    values = context.v[:, :T]
    values = torch.cat([values, torch.ones_like(values[..., :1])], dim=-1)
    memory = None
    if context.S is not None:
        memory = torch.cat([context.S, context.z[..., None]], dim=-1)
    out, memory = linear_attention(phi_q, context.phi_k[:, :T], values, initial_state=memory,
                                   output_final_state=True, chunk_size=chunk_size,
                                   backend=backend)
    return out[..., :-1], out[..., -1], memory[..., :-1], memory[..., -1]


def compose(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phi_q: torch.Tensor, phi_k: torch.Tensor,
    window: int, linear_scale: torch.Tensor | None, scale: float,
    initial_state: WindowLinearAttentionState | None, output_final_state: bool, chunk_size: int,
    *, window_part: WindowPart, backend: str, dtype: torch.dtype,
) -> tuple[torch.Tensor, WindowLinearAttentionState | None]:
    """Both parts, whichever form computes the window part (`window_part`) and whichever
    `linear_attention` backend the linear part (`backend`), in `dtype`."""
    B, T, H, _ = q.shape
    context = window_context(k, v, phi_k, initial_state, window, dtype)
    A, a = window_part(q.to(dtype), context.k, context.v, scale, window, context.start,
                       chunk_size)
    num, den, S, z = linear_part(phi_q.to(dtype), context, T, chunk_size, backend)
    o = combine(A, a, num, den, per_head_scale(linear_scale, B, H, dtype)).to(q.dtype)
    if not output_final_state:
        return o, None
    return o, next_state(context, S, z, T, window, k, v, phi_k, compute_dtype(q.dtype))


def window_linear_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    window: int,
    linear_scale: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: WindowLinearAttentionState | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, WindowLinearAttentionState | None]:
    """Same contract as `window_linear_attention_reference`; `chunk_size` is the query block
    of the window part and the chunk of the linear part."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return compose(q, k, v, phi_q, phi_k, window, linear_scale, scale, initial_state,
                   output_final_state, chunk_size, window_part=banded_window_attention,
                   backend="torch", dtype=compute_dtype(q.dtype))
