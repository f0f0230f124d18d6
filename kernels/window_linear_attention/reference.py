"""Sliding-window softmax attention plus linear attention over everything before the window,
in one normalisation (LoLCATs, Zhang et al. 2024), one token at a time: the oracle.

Per head, for the query at position t (window W >= 1, scale default D ** -0.5):

    s_tj = scale q_t . k_j  for j in the window (t - W, t], j >= 0;   m_t = max_j s_tj
    A_t = sum_win exp(s_tj - m_t) v_j              a_t = sum_win exp(s_tj - m_t)
    B_t = r_h phi_q_t . S_{t-W}                     b_t = r_h phi_q_t . z_{t-W}
    S_{t-W} = sum_{j <= t-W} phi_k_j v_j^T          z_{t-W} = sum_{j <= t-W} phi_k_j
    o_t = (A_t + B_t) / (a_t + b_t)

m_t is a stabiliser held constant (detached): gradients do not flow through it. B_t is not
scaled by exp(-m_t), so o does depend on m_t; the gradient is that of the expression with m
frozen, as LoLCATs trains it, not the total derivative. a_t >= 1 (the maximum's own term) and
b_t >= 0 for non-negative features and r, so the denominator needs no epsilon.
"""

from __future__ import annotations

import torch

from ..precision import compute_dtype
from .state import WindowLinearAttentionState, empty_state


def per_head_scale(linear_scale: torch.Tensor | None, B: int, H: int,
                   dtype: torch.dtype) -> torch.Tensor | None:
    """linear_scale (H,) or (B, H) -> (B or 1, 1, H) in dtype, broadcastable over (B, T, H)."""
    if linear_scale is None:
        return None
    rows = 1 if linear_scale.dim() == 1 else B
    return linear_scale.to(dtype).reshape(rows, 1, H)


def window_linear_attention_reference(
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
    """The definition above as a loop over time, in float32 (float64 for float64 inputs).

    q, k: (B, T, H, D); v: (B, T, H, Dv); phi_q, phi_k: (B, T, H, F); linear_scale: (H,),
    (B, H) or None (= 1). Returns o (B, T, H, Dv) in q's dtype and, when asked, the state
    after the last token.
    """
    B, T, H, D = q.shape
    W = window
    dtype = compute_dtype(q.dtype)
    scale = D ** -0.5 if scale is None else scale
    if initial_state is None:
        initial_state = empty_state(B, W, H, D, v.shape[-1], phi_k.shape[-1],
                                    device=q.device, dtype=dtype)
    filled = initial_state.filled
    empty = (torch.arange(W, device=q.device) < W - filled).view(1, W, 1, 1)
    win_k, win_v, win_f = (x.to(dtype).masked_fill(empty, 0.0) for x in initial_state[:3])
    S, z = initial_state.S.to(dtype), initial_state.z.to(dtype)
    r = per_head_scale(linear_scale, B, H, dtype)
    r = r[:, 0] if r is not None else torch.ones(1, H, dtype=dtype, device=q.device)  # (B|1, H)
    out_dtype, window_dtypes = q.dtype, (k.dtype, v.dtype, phi_k.dtype)
    q, k, v, phi_q, phi_k = (x.to(dtype) for x in (q, k, v, phi_q, phi_k))

    outputs = []
    for t in range(T):
        if filled == W:  # the oldest token leaves the window for the linear memory
            S = S + torch.einsum("bhf,bhv->bhfv", win_f[:, 0], win_v[:, 0])
            z = z + win_f[:, 0]
        win_k = torch.cat([win_k[:, 1:], k[:, t : t + 1]], dim=1)
        win_v = torch.cat([win_v[:, 1:], v[:, t : t + 1]], dim=1)
        win_f = torch.cat([win_f[:, 1:], phi_k[:, t : t + 1]], dim=1)
        filled = min(filled + 1, W)

        scores = scale * torch.einsum("bhd,bwhd->bhw", q[:, t], win_k)
        scores = scores.masked_fill(torch.arange(W, device=q.device) < W - filled, -torch.inf)
        m = scores.amax(-1, keepdim=True).detach()
        p = torch.exp(scores - m)
        A = torch.einsum("bhw,bwhv->bhv", p, win_v)
        a = p.sum(-1)
        B_t = r[..., None] * torch.einsum("bhf,bhfv->bhv", phi_q[:, t], S)
        b_t = r * torch.einsum("bhf,bhf->bh", phi_q[:, t], z)
        outputs.append((A + B_t) / (a + b_t)[..., None])

    o = torch.stack(outputs, dim=1).to(out_dtype)
    final_state = None
    if output_final_state:
        windows = (x.to(d) for x, d in zip((win_k, win_v, win_f), window_dtypes))
        final_state = WindowLinearAttentionState(*windows, S, z, filled)
    return o, final_state


def combine(A: torch.Tensor, a: torch.Tensor, num: torch.Tensor, den: torch.Tensor,
            r: torch.Tensor | None) -> torch.Tensor:
    """o = (A + r num) / (a + r den), the one normalisation of both parts.

    A, num: (B, T, H, Dv); a, den: (B, T, H); r: (B or 1, 1, H) from `per_head_scale`, or None.
    """
    if r is not None:
        num, den = r[..., None] * num, r * den
    return (A + num) / (a + den)[..., None]


def window_linear_attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    window: int,
    linear_scale: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """The weight each query gives each key from a fresh start, as a (B, H, T, T) matrix whose
    rows sum to 1: exp(s_tj - m_t) inside the window, r phi_q_t . phi_k_j before it, over
    their sum (the definition above, so weights @ v is o). LoLCATs' attention transfer
    compares these rows with the teacher's softmax by cross-entropy. Quadratic in T: a
    training-time tool. Float32 (float64 for float64 inputs); gradients as the op's.
    """
    B, T, H, D = q.shape
    dtype = compute_dtype(q.dtype)
    scale = D ** -0.5 if scale is None else scale
    q, k, phi_q, phi_k = (x.to(dtype) for x in (q, k, phi_q, phi_k))
    t = torch.arange(T, device=q.device)
    distance = t[:, None] - t[None, :]  # query index minus key index
    in_window = (distance >= 0) & (distance < window)
    before = distance >= window
    scores = scale * torch.einsum("bthd,bjhd->bhtj", q, k)
    scores = scores.masked_fill(~in_window, -torch.inf)
    m = scores.amax(-1, keepdim=True).detach()
    softmax_part = torch.exp(scores - m)
    linear_part = torch.einsum("bthf,bjhf->bhtj", phi_q, phi_k).masked_fill(~before, 0.0)
    r = per_head_scale(linear_scale, B, H, dtype)
    if r is not None:
        linear_part = r[:, 0, :, None, None] * linear_part
    numerator = softmax_part + linear_part
    return numerator / numerator.sum(-1, keepdim=True)
