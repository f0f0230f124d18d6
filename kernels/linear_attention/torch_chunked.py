"""The CPU path: parallel within chunks of `chunk_size` tokens, recurrent across chunks.

Within a chunk, G is the inclusive cumulative sum of the log-decay g, so the weight of key s on
query t (s <= t) is exp(G_t - G_s). That difference is formed before the exp, never as
exp(G_t) * exp(-G_s): with g = -20 per step the second factor overflows after a few tokens.
With a bonus the query reads the state before its own token, so its side uses G_{t-1} = G_t - g_t
(called Gq below) and the causal mask is strict.

Scalar decays (None, per head, per step and head) make exp(Gq_t - G_s) one (C, C) matrix.
Per-channel decays (B, T, H, K) give a (C, C, K) weight; to keep memory at a few times the
input, the chunk is cut into sub-chunks of <= 8 tokens: blocks between different sub-chunks
factorise around a reference point between them (both factors have exponent <= 0), and only
the diagonal blocks are formed pairwise.

Precision: G is rounded to float32, so an exponent G_t - G_s carries an absolute error of about
6e-8 * |G|, with |G| <= chunk_size * max |g|; very strong decays lose digits in proportion (a
smaller chunk_size helps), but never give inf or NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

from ..precision import compute_dtype
from .reference import expand_log_decay


def log_decay_floor(dtype: torch.dtype) -> float:
    """Where exp underflows to exactly 0 in `dtype`: flooring g there changes no weight, while
    g = -inf (a gate of exactly 0) would make -inf - (-inf) = NaN in the differences of G. The
    floor is as high as that allows because G's rounding error grows with |G|."""
    return -745.5 if dtype == torch.float64 else -104.0


SUB_CHUNK = 8  # measured fastest on CPU (vs 4, 16, 32) at K = 64


def linear_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor | None = None,
    bonus: torch.Tensor | None = None,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    output_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as `linear_attention_reference` without `normalize` (the public function
    augments v with a ones column for that).

    q, k: (B, T, H, K); v: (B, T, H, V); decay: None, (H,), (B, T, H) or (B, T, H, K);
    bonus: (H, K) or None; initial_state: (B, H, K, V). Returns o (B, T, H, V) in
    `output_dtype` (default q's) and the final state (B, H, K, V) in float32 (float64 for
    float64 inputs) when asked.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = compute_dtype(q.dtype)
    output_dtype = output_dtype or q.dtype
    g = expand_log_decay(decay, B, T, H, K, dtype)
    if g is not None:
        g = g.clamp(min=log_decay_floor(dtype))
    C = chunk_size
    n_chunks = math.ceil(T / C)
    pad = n_chunks * C - T

    def chunks(x: torch.Tensor) -> torch.Tensor:  # (B, T, H, D) -> (B, H, N, C, D), zero-padded
        x = F.pad(x.to(dtype), (0, 0, 0, 0, 0, pad))
        return rearrange(x, "b (n c) h d -> b h n c d", c=C)

    qc, kc, vc = chunks(q) * scale, chunks(k), chunks(v)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1 if bonus is not None
                                                                      else 0)
    if g is None:
        scores = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0.0)
        q_inter, k_state, chunk_decay = qc, kc, None
    else:
        # zero-padded g keeps G_last of the last chunk equal to G at the last real token
        gc = chunks(g)  # (B, H, N, C, 1 or K)
        G = gc.cumsum(-2)
        Gq = G - gc if bonus is not None else G
        G_last = G[..., -1:, :]  # (B, H, N, 1, 1 or K)
        q_inter = qc * torch.exp(Gq)
        k_state = kc * torch.exp(G_last - G)
        chunk_decay = torch.exp(G_last).transpose(-1, -2)  # (B, H, N, 1 or K, 1)
        if g.shape[-1] == 1:
            diff = Gq[..., :, 0, None] - G[..., None, :, 0]  # (B, H, N, C, C)
            weight = torch.exp(diff.masked_fill(~causal, -math.inf))
            scores = (qc @ kc.transpose(-1, -2)) * weight
        else:
            scores = _per_channel_scores(qc, kc, G, Gq, causal)
    o = scores @ vc  # (B, H, N, C, V): within the chunk

    kv = k_state.transpose(-1, -2) @ vc  # (B, H, N, K, V): each chunk's own contribution
    state = (initial_state.to(dtype) if initial_state is not None
             else q.new_zeros(B, H, K, V, dtype=dtype))
    # unbind, not kv[:, :, n]: each indexing's backward would write a full-size zero tensor,
    # making the backward quadratic in the number of chunks
    kv_per_chunk = kv.unbind(2)
    decay_per_chunk = chunk_decay.unbind(2) if chunk_decay is not None else None
    entering = []
    for n in range(n_chunks):
        entering.append(state)
        if decay_per_chunk is not None:
            state = decay_per_chunk[n] * state
        state = state + kv_per_chunk[n]
    o = o + q_inter @ torch.stack(entering, dim=2)
    o = rearrange(o, "b h n c v -> b (n c) h v")[:, :T]
    if bonus is not None:
        o = o + _bonus_term(q, k, v, bonus, scale, dtype)
    return o.to(output_dtype), (state if output_final_state else None)


def _per_channel_scores(qc, kc, G, Gq, causal):
    """(B, H, N, C, C) scores sum_k q_tk k_sk exp(Gq_tk - G_sk), masked, stably (see top)."""
    C = qc.shape[-2]
    c = max(d for d in range(1, min(SUB_CHUNK, C) + 1) if C % d == 0)
    n = C // c
    split = lambda x: rearrange(x, "... (i c) k -> ... i c k", c=c)  # noqa: E731
    q_sub, k_sub, G_sub, Gq_sub = split(qc), split(kc), split(G), split(Gq)
    # Between sub-chunks: reference point r_i = last token before sub-chunk i, so that for a
    # query t in i and a key s in an earlier sub-chunk both Gq_t - G_r <= 0 and G_r - G_s <= 0.
    G_ref = torch.cat([torch.zeros_like(G_sub[..., :1, -1, :]), G_sub[..., :-1, -1, :]], dim=-2)
    q_off = q_sub * torch.exp(Gq_sub - G_ref.unsqueeze(-2))  # (B, H, N, n, c, K)
    # keys at or after r_i are masked below; the clamp keeps their exp finite meanwhile
    k_off = kc.unsqueeze(-3) * torch.exp((G_ref.unsqueeze(-2) - G.unsqueeze(-3)).clamp(max=0))
    scores = q_off @ k_off.transpose(-1, -2)  # (B, H, N, n, c, C)
    key_sub_chunk = torch.arange(C, device=qc.device) // c
    earlier = key_sub_chunk[None, :] < torch.arange(n, device=qc.device)[:, None]  # (n, C)
    scores = scores * earlier[:, None, :]
    scores = rearrange(scores, "... i c s -> ... (i c) s")
    # Diagonal blocks, pairwise: (B, H, N, n, c, c, K)
    diff = Gq_sub.unsqueeze(-2) - G_sub.unsqueeze(-3)
    in_block = causal[:c, :c].unsqueeze(-1)
    weight = torch.exp(diff.masked_fill(~in_block, -math.inf))
    diag = (q_sub.unsqueeze(-2) * k_sub.unsqueeze(-3) * weight).sum(-1)  # (B, H, N, n, c, c)
    eye = torch.eye(n, dtype=diag.dtype, device=diag.device)
    diag = torch.einsum("...itc,ij->...itjc", diag, eye)
    return scores + rearrange(diag, "... i t j c -> ... (i t) (j c)")


def _bonus_term(q, k, v, bonus, scale, dtype):
    """scale (q_t . (u * k_t)) v_t: token t's own contribution under RWKV-6's bonus u."""
    weight = (q.to(dtype) * bonus.to(dtype) * k.to(dtype)).sum(-1, keepdim=True)
    return scale * weight * v.to(dtype)

