"""The CPU path of RWKV-4's WKV: parallel inside chunks of tokens, recurrent across them.

Inside a chunk every output is a weighted average over the carried state and the chunk's tokens
with log-weights

    state:        max + t * decay                     (the state decayed t steps)
    token i < t:  k_i + (t - 1 - i) * decay
    token i = t:  u + k_t                             (the bonus)

with decay = -e^w. The pairwise (t, i) log-weights are formed explicitly and the per-row maximum
subtracted before exp, so no exponent overflows however large the keys or long the sequence; the
weights cannot be factored as e^{(t-1) decay} e^{k_i - i decay} because e^{-i decay} overflows
for fast-decaying channels. Across chunks (num, den, max) is carried exactly as the sequential
form carries it, so the final state is the same function of the inputs.
"""

from __future__ import annotations

import torch

from ..precision import compute_dtype
from .reference import empty_wkv4_state


def wkv4_torch(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as `wkv4_reference`; k, v: (B, T, C), w, u: (C,), state (B, 3, C)."""
    B, T, C = k.shape
    acc = compute_dtype(k.dtype)
    if initial_state is None:
        initial_state = empty_wkv4_state(B, C, k.device, acc)
    num, den, mx = initial_state.to(acc).unbind(1)
    decay = -torch.exp(w.to(acc))
    u = u.to(acc)
    out_dtype = v.dtype
    k, v = k.to(acc), v.to(acc)
    # Log-weights that depend only on (decay, u) are built once for a full chunk; a shorter
    # last chunk uses their top-left corner (pairs) or tail (token_to_end).
    n = min(chunk_size, T)
    pos = torch.arange(n, device=k.device)
    dist = (pos[:, None] - 1 - pos[None, :]).to(acc)[..., None]  # (t, i, 1): t - 1 - i
    future = torch.full((n, n, C), float("-inf"), device=k.device, dtype=acc)
    pairs = torch.where(dist >= 0, dist * decay, torch.where(dist == -1, u, future))  # (t, i, C)
    state_to_row = pos[:, None].to(acc) * decay  # (n, C): the state decayed t steps
    token_to_end = (n - 1 - pos)[:, None].to(acc) * decay  # (n, C): token i to the chunk's end
    ys = []
    # split, not slice: a slice's backward writes a zero tensor of the whole sequence per chunk
    for kc, vc in zip(k.split(chunk_size, dim=1), v.split(chunk_size, dim=1)):
        m = kc.shape[1]
        logw = kc[:, None] + pairs[:m, :m]  # (B, t, i, C)
        state_log = mx[:, None] + state_to_row[:m]  # (B, t, C)
        # the output does not depend on the stabiliser: no gradient through it
        p = torch.maximum(logw.amax(2), state_log).detach()
        weights = torch.exp(logw - p[:, :, None])
        carried = torch.exp(state_log - p)
        ys.append(
            (carried * num[:, None] + (weights * vc[:, None]).sum(2))
            / (carried * den[:, None] + weights.sum(2))
        )
        # carry: decay the state m steps and add every token of the chunk
        token_log = kc + token_to_end[n - m :]  # (B, m, C)
        state_log = mx + m * decay
        new_max = torch.maximum(token_log.amax(1), state_log)
        weights = torch.exp(token_log - new_max[:, None])
        carried = torch.exp(state_log - new_max)
        num = carried * num + (weights * vc).sum(1)
        den = carried * den + weights.sum(1)
        mx = new_max
    y = torch.cat(ys, dim=1).to(out_dtype) if ys else v.new_zeros(B, 0, C, dtype=out_dtype)
    final_state = torch.stack([num, den, mx], dim=1) if output_final_state else None
    return y, final_state
