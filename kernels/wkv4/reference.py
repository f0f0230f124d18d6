"""RWKV-4's WKV recurrence written as the sequential loop: the oracle for the other forms.

Per channel c, with per-step decay exp(-exp(w_c)) and bonus u_c for the current token:

    y_t = (sum_{i<t} e^{-(t-1-i) e^w + k_i} v_i + e^{u + k_t} v_t)
        / (sum_{i<t} e^{-(t-1-i) e^w + k_i}     + e^{u + k_t})

The sums live in the state as (num, den, max) with the real numerator num * e^max (the same for
den): exponents are compared to the running maximum before exp, so large keys or long sequences
never overflow. This is the form of transformers' `rwkv_linear_attention_cpu`.
"""

from __future__ import annotations

import torch

from ..precision import compute_dtype

# The "empty" running maximum: e^(max - anything finite) is exactly 0 in float32 and float64.
EMPTY_MAX = -1e38


def empty_wkv4_state(
    batch_size: int, channels: int, device=None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The state before any token: num = den = 0, max = EMPTY_MAX. Shape (B, 3, C)."""
    state = torch.zeros(batch_size, 3, channels, device=device, dtype=dtype)
    state[:, 2] = EMPTY_MAX
    return state


# the state's dtype is the compute dtype (float32 for half inputs, as in transformers' kernel);
# the name stays because zoo.layers' RWKV mixers size their states with it
state_dtype = compute_dtype


def wkv4_reference(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """w, u: (C,); k, v: (B, T, C); initial_state: (B, 3, C) rows (num, den, max).

    Returns y (B, T, C) in v's dtype and, when asked, the state after the last token (B, 3, C).
    """
    B, T, C = k.shape
    acc = compute_dtype(k.dtype)
    if initial_state is None:
        initial_state = empty_wkv4_state(B, C, k.device, acc)
    num, den, mx = initial_state.to(acc).unbind(1)
    decay = -torch.exp(w.to(acc))  # log of the per-step decay
    u = u.to(acc)
    ys = []
    for t in range(T):
        kt, vt = k[:, t].to(acc), v[:, t].to(acc)
        # output: the state plus the current token weighted by the bonus
        p = torch.maximum(mx, u + kt)
        e1, e2 = torch.exp(mx - p), torch.exp(u + kt - p)
        ys.append((e1 * num + e2 * vt) / (e1 * den + e2))
        # state: decay one step, then add the current token
        p = torch.maximum(mx + decay, kt)
        e1, e2 = torch.exp(mx + decay - p), torch.exp(kt - p)
        num, den, mx = e1 * num + e2 * vt, e1 * den + e2, p
    y = torch.stack(ys, dim=1).to(v.dtype)
    final_state = torch.stack([num, den, mx], dim=1) if output_final_state else None
    return y, final_state
