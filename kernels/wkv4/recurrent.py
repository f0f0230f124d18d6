"""The one-token form, for decoding: the step of `reference.py` taken once, from the carried
(num, den, max) state; at T = 1 the step is the whole computation, and the cheapest form."""

from __future__ import annotations

import torch

from ..precision import compute_dtype
from .reference import empty_wkv4_state


def wkv4_recurrent(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`wkv4_reference`'s contract for one token.

    w, u: (C,); k, v: (B, 1, C); initial_state: (B, 3, C) rows (num, den, max). Returns
    y (B, 1, C) in v's dtype and, when asked, the state after the token (B, 3, C).
    """
    B, T, C = k.shape
    if T != 1:
        raise ValueError(f"wkv4_recurrent: takes one token (T = 1), got T = {T}; wkv4 runs "
                         "longer inputs in chunks")
    acc = compute_dtype(k.dtype)
    if initial_state is None:
        initial_state = empty_wkv4_state(B, C, k.device, acc)
    num, den, mx = initial_state.to(acc).unbind(1)
    decay = -torch.exp(w.to(acc))  # log of the per-step decay
    u, kt, vt = u.to(acc), k[:, 0].to(acc), v[:, 0].to(acc)
    # output: the state plus the token weighted by the bonus, exponents against their maximum
    p = torch.maximum(mx, u + kt)
    e1, e2 = torch.exp(mx - p), torch.exp(u + kt - p)
    y = ((e1 * num + e2 * vt) / (e1 * den + e2)).unsqueeze(1).to(v.dtype)
    if not output_final_state:
        return y, None
    # state: decay one step, then add the token
    p = torch.maximum(mx + decay, kt)
    e1, e2 = torch.exp(mx + decay - p), torch.exp(kt - p)
    return y, torch.stack([e1 * num + e2 * vt, e1 * den + e2, p], dim=1)
