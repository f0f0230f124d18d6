"""The generalized delta rule's CPU path: parallel within chunks of C tokens, recurrent across.

Within a chunk entered with state S_0, let G_i be the inclusive cumulative log-decay up to
position i (scalar or per key channel; 0 without decay) and G'_i = G_i - g_i the exclusive one.
With r_i = S_{i-1}^T a_i (what token i reads from the state) the update is a sum,
S_i = e^{g_i} S_{i-1} + b_i r_i^T + k_i v_i^T, so

    S_i = e^{G_i} S_0 + sum_{j <= i} e^{G_i - G_j} (b_j r_j^T + k_j v_j^T)

(e^{...} acting per key channel). Reading it at i - 1 gives the reads of the whole chunk as a
unit lower triangular system:

    (I - P_ab) R = P_ak V + (a e^{G'}) S_0,   P_xy[i, j] = sum_c x_ic y_jc e^{G'_ic - G_jc}, j < i

so R = R_0 + W S_0 with [R_0 | W] = (I - P_ab)^{-1} [P_ak V | a e^{G'}], one triangular solve
over the chunk's own tokens. Then, with Q_xy[i, j] = scale sum_c q_ic y_jc e^{G_ic - G_jc} for
j <= i,

    O     = (scale Q e^{G}) S_0 + Q_qk V + Q_qb R
    S_out = e^{G_C} S_0 + (K e^{G_C - G})^T V + (B e^{G_C - G})^T R

Only R = R_0 + W S_0, the output's state terms and the state update run chunk after chunk.
Every exponent is a later cumulative decay minus an earlier one (or G itself), <= 0 and formed
before the exp, as in `torch_chunked.py`; per-channel weights use linear attention's sub-chunk
scheme.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

from ..linear_attention.torch_chunked import _per_channel_scores, log_decay_floor
from ..precision import compute_dtype


def generalized_delta_rule_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    decay: torch.Tensor | None = None,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as `generalized_delta_rule_reference`; autograd gives the backward.

    q, k, a, b: (B, T, H, K); v: (B, T, H, V); decay: None, (B, T, H) or (B, T, H, K);
    initial_state: (B, H, K, V). Returns o (B, T, H, V) in q's dtype and the final state
    (B, H, K, V) in float32 (float64 for float64 inputs) when asked.
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

    # zero padding (k = v = a = b = g = 0) leaves the state untouched by the padded positions
    qc, kc, vc, ac, bc = chunks(q) * scale, chunks(k), chunks(v), chunks(a), chunks(b)
    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    inclusive = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(0)

    def pairs(x, ys, causal, G_x=None, G_y=None):
        """For each y in ys, (B, H, N, C, C): sum_c x_ic y_jc e^{G_x,ic - G_y,jc} where `causal`,
        else 0; the ys share one computation of the weights."""
        y = torch.stack(ys)
        if G_x is None:
            return (x @ y.transpose(-1, -2)).masked_fill(~causal, 0.0).unbind(0)
        if G_x.shape[-1] == 1:
            diff = (G_x - G_y.transpose(-1, -2)).masked_fill(~causal, -math.inf)
            return ((x @ y.transpose(-1, -2)) * torch.exp(diff)).unbind(0)
        return _per_channel_scores(x, y, G_y, G_x, causal).unbind(0)

    if decay is None:
        G = G_read = None
        q_entering, a_entering, k_leaving, b_leaving, chunk_decay = qc, ac, kc, bc, None
    else:
        g = decay.to(dtype).clamp(min=log_decay_floor(dtype))
        gc = chunks(g if g.dim() == 4 else g.unsqueeze(-1))  # (B, H, N, C, 1 or K)
        G = gc.cumsum(-2)
        G_read = G - gc  # token i reads S_{i-1}: the exclusive sum
        G_last = G[..., -1:, :]
        q_entering, a_entering = qc * torch.exp(G), ac * torch.exp(G_read)
        k_leaving, b_leaving = kc * torch.exp(G_last - G), bc * torch.exp(G_last - G)
        chunk_decay = torch.exp(G_last).transpose(-1, -2)  # (B, H, N, 1 or K, 1)

    reads_from_keys, reads_from_b = pairs(ac, [kc, bc], strict, G_read, G)  # P_ak, P_ab
    reads_from_values = reads_from_keys @ vc
    unit_lower = torch.eye(C, dtype=dtype, device=q.device) - reads_from_b
    solved = torch.linalg.solve_triangular(
        unit_lower, torch.cat([reads_from_values, a_entering], -1), upper=False,
        unitriangular=True)
    reads_free, w = solved.split([V, K], dim=-1)
    scores_k, scores_b = pairs(qc, [kc, bc], inclusive, G, G)  # Q_qk, Q_qb
    o_values = scores_k @ vc
    kv = k_leaving.transpose(-1, -2) @ vc  # (B, H, N, K, V)

    state = (initial_state.to(dtype) if initial_state is not None
             else q.new_zeros(B, H, K, V, dtype=dtype))
    # unbind, not x[:, :, n]: each indexing's backward would write a full-size zero tensor
    per_chunk = zip(reads_free.unbind(2), w.unbind(2), q_entering.unbind(2),
                    o_values.unbind(2), scores_b.unbind(2), b_leaving.unbind(2), kv.unbind(2))
    decays = chunk_decay.unbind(2) if chunk_decay is not None else [None] * n_chunks
    outputs = []
    for (reads_free_n, w_n, q_n, o_values_n, scores_b_n, b_leaving_n, kv_n), decay_n in zip(
            per_chunk, decays):
        reads = reads_free_n + w_n @ state  # (B, H, C, V): r_i = S_{i-1}^T a_i
        outputs.append(q_n @ state + o_values_n + scores_b_n @ reads)
        state = state if decay_n is None else decay_n * state
        state = state + kv_n + b_leaving_n.transpose(-1, -2) @ reads
    o = rearrange(torch.stack(outputs, dim=2), "b h n c v -> b (n c) h v")[:, :T]
    return o.to(q.dtype), (state if output_final_state else None)
