"""The CPU path: the WY (UT) form of the delta rule, parallel within chunks of C tokens and
recurrent across them.

Within a chunk entered with state S_0, let G_i be the inclusive cumulative log-decay up to
position i (a scalar, or a vector over K for KDA; 0 without decay) and write the state as

    S_i = e^{G_i} S_0 + sum_{j <= i} (e^{G_i - G_j} k_j) u_j^T,
    u_j = beta_j (v_j - (A_j S_{j-1})^T k_j)             (the corrections actually written)

(e^{G} acting per key channel for KDA). Substituting S_{j-1} into u_j gives a unit lower
triangular system for the corrections of the whole chunk:

    (I + L) U = diag(beta) V - diag(beta) (K e^{G}) S_0,
    L[i, j] = beta_i sum_c k_ic k_jc e^{G_ic - G_jc}     for j < i (zero elsewhere)

so, with T = (I + L)^{-1} applied by one triangular solve, U = U_0 - W S_0 where
U_0 = T (beta V) and W = T (beta K e^{G}) depend on the chunk's own tokens only. Then

    O     = (scale Q e^{G}) S_0 + M U,   M[i, j] = scale sum_c q_ic k_jc e^{G_ic - G_jc}, j <= i
    S_out = e^{G_C} S_0 + (K e^{G_C - G})^T U

Everything except the three S_0 products is computed for all chunks at once; only
U = U_0 - W S_0, the output's state term and the state update run chunk after chunk.

Stability: every exponent is G_later - G_earlier or G itself, both <= 0, formed before the exp
(masked entries become -inf, never exp of a positive number), so g = -20 per step underflows
to zero instead of overflowing. For KDA the pairwise weights e^{G_ic - G_jc} are formed by
linear attention's sub-chunk scheme (`_per_channel_scores`), a few times the input's memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

from ..linear_attention.torch_chunked import _per_channel_scores, log_decay_floor
from ..precision import compute_dtype


def delta_rule_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    decay: torch.Tensor | None = None,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as `delta_rule_reference`; autograd gives the backward.

    q, k: (B, T, H, K); v: (B, T, H, V); beta: (B, T, H); decay: None, (B, T, H) or
    (B, T, H, K); initial_state: (B, H, K, V). Returns o (B, T, H, V) in q's dtype and the final
    state (B, H, K, V) in float32 (float64 for float64 inputs) when asked.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = compute_dtype(q.dtype)
    C = chunk_size
    n_chunks = math.ceil(T / C)
    pad = n_chunks * C - T

    def chunks(x: torch.Tensor) -> torch.Tensor:  # (B, T, H, D) -> (B, H, N, C, D), zero-padded
        x = F.pad(x.to(dtype), (0, 0, 0, 0, 0, pad))
        return rearrange(x, "b (n c) h d -> b h n c d", c=C)

    # zero padding (k = v = beta = g = 0) leaves the state untouched by the padded positions
    qc, kc, vc, bc = chunks(q) * scale, chunks(k), chunks(v), chunks(beta.unsqueeze(-1))
    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    inclusive = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(0)
    if decay is None:
        kk = (kc @ kc.transpose(-1, -2)).masked_fill(~strict, 0.0)
        scores = (qc @ kc.transpose(-1, -2)).masked_fill(~inclusive, 0.0)
        q_entering, k_entering, k_leaving, chunk_decay = qc, kc, kc, None
    else:
        g = decay.to(dtype).clamp(min=log_decay_floor(dtype))
        G = chunks(g if g.dim() == 4 else g.unsqueeze(-1)).cumsum(-2)  # (B, H, N, C, 1 or K)
        G_last = G[..., -1:, :]
        if G.shape[-1] == 1:
            diff = G - G.transpose(-1, -2)  # (B, H, N, C, C): G_i - G_j
            kk = (kc @ kc.transpose(-1, -2)) * torch.exp(diff.masked_fill(~strict, -math.inf))
            scores = (qc @ kc.transpose(-1, -2)) * torch.exp(
                diff.masked_fill(~inclusive, -math.inf))
        else:
            # one call for both (its exponentials are shared): the strictly lower part of
            # k k^T's inclusive scores is its strict scores
            kk, scores = _per_channel_scores(torch.stack([kc, qc]), kc, G, G, inclusive)
            kk = kk.masked_fill(~strict, 0.0)
        q_entering, k_entering = qc * torch.exp(G), kc * torch.exp(G)
        k_leaving = kc * torch.exp(G_last - G)
        chunk_decay = torch.exp(G_last).transpose(-1, -2)  # (B, H, N, 1 or K, 1)

    unit_lower = torch.eye(C, dtype=dtype, device=q.device) + bc * kk  # I + L
    # T = (I + L)^{-1} applied to beta V and beta K e^{G} in one solve: U_0 and W
    solved = torch.linalg.solve_triangular(
        unit_lower, torch.cat([bc * vc, bc * k_entering], -1), upper=False, unitriangular=True)
    u_free, w = solved.split([V, K], dim=-1)

    state = (initial_state.to(dtype) if initial_state is not None
             else q.new_zeros(B, H, K, V, dtype=dtype))
    # unbind, not x[:, :, n]: each indexing's backward would write a full-size zero tensor
    per_chunk = zip(u_free.unbind(2), w.unbind(2), q_entering.unbind(2), scores.unbind(2),
                    k_leaving.unbind(2))
    decays = chunk_decay.unbind(2) if chunk_decay is not None else [None] * n_chunks
    outputs = []
    for (u_free_n, w_n, q_n, scores_n, k_leaving_n), decay_n in zip(per_chunk, decays):
        u = u_free_n - w_n @ state  # (B, H, C, V): the corrections written in this chunk
        outputs.append(q_n @ state + scores_n @ u)
        state = state if decay_n is None else decay_n * state
        state = state + k_leaving_n.transpose(-1, -2) @ u
    o = rearrange(torch.stack(outputs, dim=2), "b h n c v -> b (n c) h v")[:, :T]
    return o.to(q.dtype), (state if output_final_state else None)
