"""T = 1, the decode step: the new token joins the window, the oldest leaves it for S, z."""

from __future__ import annotations

import torch

from ..precision import compute_dtype
from .reference import combine, per_head_scale
from .state import WindowLinearAttentionState, next_state, window_context


def window_linear_attention_step(
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
) -> tuple[torch.Tensor, WindowLinearAttentionState | None]:
    """Same contract as `window_linear_attention_reference` for one token: q, k (B, 1, H, D);
    v (B, 1, H, Dv); phi_q, phi_k (B, 1, H, F)."""
    B, _, H, D = q.shape
    W = window
    dtype = compute_dtype(q.dtype)
    scale = D ** -0.5 if scale is None else scale
    context = window_context(k, v, phi_k, initial_state, W, dtype)  # (B, W + 1, H, ·)
    scores = scale * torch.einsum("bhd,bwhd->bhw", q[:, 0].to(dtype), context.k[:, 1:])
    slot = torch.arange(1, W + 1, device=q.device)  # context index of window slot 0 .. W - 1
    scores = scores.masked_fill(slot < context.start, -torch.inf)
    m = scores.amax(-1, keepdim=True).detach()
    p = torch.exp(scores - m)
    A = torch.einsum("bhw,bwhv->bhv", p, context.v[:, 1:])
    a = p.sum(-1)
    # context index 0 is the token leaving the window (zero when the window was not full)
    S = torch.einsum("bhf,bhv->bhfv", context.phi_k[:, 0], context.v[:, 0])
    z = context.phi_k[:, 0]
    if context.S is not None:
        S, z = S + context.S, z + context.z
    phi_q_t = phi_q[:, 0].to(dtype)
    num = torch.einsum("bhf,bhfv->bhv", phi_q_t, S)
    den = torch.einsum("bhf,bhf->bh", phi_q_t, z)
    r = per_head_scale(linear_scale, B, H, dtype)
    o = combine(A[:, None], a[:, None], num[:, None], den[:, None], r).to(q.dtype)
    if not output_final_state:
        return o, None
    return o, next_state(context, S, z, 1, W, k, v, phi_k, dtype)
