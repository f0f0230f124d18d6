"""Chunked Triton kernels for `linear_attention`, forward and backward, in one autograd Function.

The sequence is cut into chunks of C tokens. G is the inclusive cumulative log-decay within a
chunk (computed in PyTorch: O(T K)); Gq is the query side's (G itself, or G_{t-1} = G - g with
a bonus, whose mask is then strict). Per chunk n, with h_n the state entering it:

    o_n     = (scale q_n * exp(Gq_n)) h_n + A_n v_n                     (_output_kernel)
    A_n[t, s] = scale sum_k q_tk k_sk exp(Gq_tk - G_sk), causal          (_scores_kernel)
    h_{n+1} = exp(G_last) * h_n + (k_n * exp(G_last - G_n))^T v_n       (_state_fwd_kernel)

Every exponent is a difference formed before the exp and is <= 0, so strong decays underflow
to zero instead of overflowing. For per-channel decays A_n cannot be one matmul; the scores
kernel forms it pairwise, one key column at a time (C steps of (C, K) work).

Backward: _state_bwd_kernel runs the chunks in reverse for the state gradients, _dv_kernel and
_dqdk_kernel give the input gradients. The decay gradient then follows in PyTorch from the
identity dL/dLambda_t = q_t dq_t - k_t dk_t (Lambda the cumulative log-decay over the whole
sequence; q's term moves to t - 1 with a bonus) plus the final state's term, and
dg = its reverse cumulative sum: O(T K) work.

Tiles hold all K channels (K <= 256) and blocks of V; K and V need not be powers of two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..precision import compute_dtype
from .reference import expand_log_decay
from .torch_chunked import _bonus_term, log_decay_floor

MAX_K = 256
NO_DECAY, SCALAR_DECAY, CHANNEL_DECAY = 0, 1, 2


@triton.jit
def _load_rows(ptr, b, h, t, T, H, D, cols, n_cols):
    """(len(t), len(cols)) tile of a (B, T, H, D) tensor, zero outside t < T and cols < D."""
    mask = (t < T)[:, None] & (cols < n_cols)[None, :]
    return tl.load(ptr + ((b * T + t[:, None]) * H + h) * D + cols[None, :], mask=mask,
                   other=0.0).to(tl.float32)


@triton.jit
def _load_cols(ptr, b, h, t, T, H, D, rows, n_rows):
    """The transposed tile, (len(rows), len(t))."""
    mask = (rows < n_rows)[:, None] & (t < T)[None, :]
    return tl.load(ptr + ((b * T + t[None, :]) * H + h) * D + rows[:, None], mask=mask,
                   other=0.0).to(tl.float32)


@triton.jit
def _load_scalar_decay(ptr, b, h, t, T, H):
    return tl.load(ptr + (b * T + t) * H + h, mask=t < T, other=0.0).to(tl.float32)


@triton.jit
def _state_fwd_kernel(
    k_ptr, v_ptr, G_ptr, h0_ptr, h_ptr, ht_ptr, T, H, K, V, NC,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr,
    HAS_H0: tl.constexpr, PRECISION: tl.constexpr,
):
    i_bh, i_v = tl.program_id(0), tl.program_id(1)
    b, h = i_bh // H, i_bh % H
    kk = tl.arange(0, BK)
    vv = i_v * BV + tl.arange(0, BV)
    state_offsets = kk[:, None] * V + vv[None, :]
    state_mask = (kk < K)[:, None] & (vv < V)[None, :]
    if HAS_H0:
        S = tl.load(h0_ptr + i_bh * K * V + state_offsets, mask=state_mask,
                    other=0.0).to(tl.float32)
    else:
        S = tl.zeros((BK, BV), dtype=tl.float32)
    for n in range(NC):
        tl.store(h_ptr + (i_bh * NC + n) * K * V + state_offsets, S, mask=state_mask)
        t = n * C + tl.arange(0, C)
        last = tl.minimum(n * C + C, T) - 1
        k_t = _load_cols(k_ptr, b, h, t, T, H, K, kk, K)  # (BK, C)
        v_c = _load_rows(v_ptr, b, h, t, T, H, V, vv, V)  # (C, BV)
        if DECAY == 1:
            G_c = _load_scalar_decay(G_ptr, b, h, t, T, H)
            G_last = tl.load(G_ptr + (b * T + last) * H + h).to(tl.float32)
            k_t = k_t * tl.exp(tl.minimum(G_last - G_c, 0.0))[None, :]
            S = S * tl.exp(G_last)
        if DECAY == 2:
            G_t = _load_cols(G_ptr, b, h, t, T, H, K, kk, K)
            G_last = tl.load(G_ptr + ((b * T + last) * H + h) * K + kk, mask=kk < K,
                             other=0.0).to(tl.float32)
            k_t = k_t * tl.exp(tl.minimum(G_last[:, None] - G_t, 0.0))
            S = S * tl.exp(G_last)[:, None]
        S += tl.dot(k_t, v_c, input_precision=PRECISION)
    tl.store(ht_ptr + i_bh * K * V + state_offsets, S, mask=state_mask)


@triton.jit
def _scores_kernel(
    q_ptr, k_ptr, G_ptr, Gq_ptr, A_ptr, scale, T, H, K, NC,
    C: tl.constexpr, BK: tl.constexpr, DECAY: tl.constexpr, STRICT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    b, h = i_bh // H, i_bh % H
    kk = tl.arange(0, BK)
    pos = tl.arange(0, C)
    t = i_n * C + pos
    q_c = _load_rows(q_ptr, b, h, t, T, H, K, kk, K)
    if DECAY == 2:
        Gq_c = _load_rows(Gq_ptr, b, h, t, T, H, K, kk, K)
        A = tl.zeros((C, C), dtype=tl.float32)
        for s in range(C):
            row = ((b * T + i_n * C + s) * H + h) * K + kk
            valid = (kk < K) & (kk * 0 + i_n * C + s < T)
            k_s = tl.load(k_ptr + row, mask=valid, other=0.0).to(tl.float32)
            G_s = tl.load(G_ptr + row, mask=valid, other=0.0).to(tl.float32)
            weight = tl.exp(tl.minimum(Gq_c - G_s[None, :], 0.0))
            column = tl.sum(q_c * k_s[None, :] * weight, axis=1)
            A = tl.where(pos[None, :] == s, column[:, None], A)
    else:
        k_c = _load_rows(k_ptr, b, h, t, T, H, K, kk, K)
        A = tl.dot(q_c, tl.trans(k_c), input_precision=PRECISION)
        if DECAY == 1:
            Gq_c = _load_scalar_decay(Gq_ptr, b, h, t, T, H)
            G_c = _load_scalar_decay(G_ptr, b, h, t, T, H)
            A = A * tl.exp(tl.minimum(Gq_c[:, None] - G_c[None, :], 0.0))
    if STRICT:
        causal = pos[:, None] > pos[None, :]
    else:
        causal = pos[:, None] >= pos[None, :]
    A = tl.where(causal, A * scale, 0.0)
    tl.store(A_ptr + (i_bh * NC + i_n) * C * C + pos[:, None] * C + pos[None, :], A)


@triton.jit
def _output_kernel(
    q_ptr, v_ptr, Gq_ptr, h_ptr, A_ptr, o_ptr, scale, T, H, K, V, NC,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_n, i_bh, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = i_bh // H, i_bh % H
    kk = tl.arange(0, BK)
    vv = i_v * BV + tl.arange(0, BV)
    pos = tl.arange(0, C)
    t = i_n * C + pos
    q_c = _load_rows(q_ptr, b, h, t, T, H, K, kk, K) * scale
    if DECAY == 1:
        q_c = q_c * tl.exp(_load_scalar_decay(Gq_ptr, b, h, t, T, H))[:, None]
    if DECAY == 2:
        q_c = q_c * tl.exp(_load_rows(Gq_ptr, b, h, t, T, H, K, kk, K))
    state = tl.load(h_ptr + (i_bh * NC + i_n) * K * V + kk[:, None] * V + vv[None, :],
                    mask=(kk < K)[:, None] & (vv < V)[None, :], other=0.0)
    A = tl.load(A_ptr + (i_bh * NC + i_n) * C * C + pos[:, None] * C + pos[None, :])
    v_c = _load_rows(v_ptr, b, h, t, T, H, V, vv, V)
    o = tl.dot(q_c, state, input_precision=PRECISION)
    o += tl.dot(A, v_c, input_precision=PRECISION)
    tl.store(o_ptr + ((b * T + t[:, None]) * H + h) * V + vv[None, :],
             o.to(o_ptr.dtype.element_ty), mask=(t < T)[:, None] & (vv < V)[None, :])


@triton.jit
def _state_bwd_kernel(
    q_ptr, do_ptr, Gq_ptr, G_ptr, dht_ptr, dh_ptr, dh0_ptr, scale, T, H, K, V, NC,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # dh_n (gradient of the state leaving chunk n) = exp(G_last) dh_{n+1} + q~_{n+1}^T do_{n+1}
    i_bh, i_v = tl.program_id(0), tl.program_id(1)
    b, h = i_bh // H, i_bh % H
    kk = tl.arange(0, BK)
    vv = i_v * BV + tl.arange(0, BV)
    state_offsets = kk[:, None] * V + vv[None, :]
    state_mask = (kk < K)[:, None] & (vv < V)[None, :]
    dS = tl.load(dht_ptr + i_bh * K * V + state_offsets, mask=state_mask,
                 other=0.0).to(tl.float32)
    for i in range(NC):
        n = NC - 1 - i
        tl.store(dh_ptr + (i_bh * NC + n) * K * V + state_offsets, dS, mask=state_mask)
        t = n * C + tl.arange(0, C)
        last = tl.minimum(n * C + C, T) - 1
        q_t = _load_cols(q_ptr, b, h, t, T, H, K, kk, K) * scale  # (BK, C)
        do_c = _load_rows(do_ptr, b, h, t, T, H, V, vv, V)
        if DECAY == 1:
            q_t = q_t * tl.exp(_load_scalar_decay(Gq_ptr, b, h, t, T, H))[None, :]
            dS = dS * tl.exp(tl.load(G_ptr + (b * T + last) * H + h).to(tl.float32))
        if DECAY == 2:
            q_t = q_t * tl.exp(_load_cols(Gq_ptr, b, h, t, T, H, K, kk, K))
            G_last = tl.load(G_ptr + ((b * T + last) * H + h) * K + kk, mask=kk < K,
                             other=0.0).to(tl.float32)
            dS = dS * tl.exp(G_last)[:, None]
        dS += tl.dot(q_t, do_c, input_precision=PRECISION)
    tl.store(dh0_ptr + i_bh * K * V + state_offsets, dS, mask=state_mask)


@triton.jit
def _dv_kernel(
    k_ptr, do_ptr, G_ptr, dh_ptr, A_ptr, dv_ptr, T, H, K, V, NC,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # dv_n = A_n^T do_n + (k_n * exp(G_last - G_n)) dh_n
    i_n, i_bh, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = i_bh // H, i_bh % H
    kk = tl.arange(0, BK)
    vv = i_v * BV + tl.arange(0, BV)
    pos = tl.arange(0, C)
    t = i_n * C + pos
    last = tl.minimum(i_n * C + C, T) - 1
    k_c = _load_rows(k_ptr, b, h, t, T, H, K, kk, K)
    if DECAY == 1:
        G_c = _load_scalar_decay(G_ptr, b, h, t, T, H)
        G_last = tl.load(G_ptr + (b * T + last) * H + h).to(tl.float32)
        k_c = k_c * tl.exp(tl.minimum(G_last - G_c, 0.0))[:, None]
    if DECAY == 2:
        G_c = _load_rows(G_ptr, b, h, t, T, H, K, kk, K)
        G_last = tl.load(G_ptr + ((b * T + last) * H + h) * K + kk, mask=kk < K,
                         other=0.0).to(tl.float32)
        k_c = k_c * tl.exp(tl.minimum(G_last[None, :] - G_c, 0.0))
    dstate = tl.load(dh_ptr + (i_bh * NC + i_n) * K * V + kk[:, None] * V + vv[None, :],
                     mask=(kk < K)[:, None] & (vv < V)[None, :], other=0.0)
    A = tl.load(A_ptr + (i_bh * NC + i_n) * C * C + pos[:, None] * C + pos[None, :])
    do_c = _load_rows(do_ptr, b, h, t, T, H, V, vv, V)
    dv = tl.dot(tl.trans(A), do_c, input_precision=PRECISION)
    dv += tl.dot(k_c, dstate, input_precision=PRECISION)
    tl.store(dv_ptr + ((b * T + t[:, None]) * H + h) * V + vv[None, :], dv,
             mask=(t < T)[:, None] & (vv < V)[None, :])


@triton.jit
def _dqdk_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, G_ptr, Gq_ptr, h_ptr, dh_ptr, dq_ptr, dk_ptr, scale,
    T, H, K, V, NC,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr,
    STRICT: tl.constexpr, PRECISION: tl.constexpr,
):
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    b, h = i_bh // H, i_bh % H
    kk = tl.arange(0, BK)
    pos = tl.arange(0, C)
    t = i_n * C + pos
    last = tl.minimum(i_n * C + C, T) - 1
    dq = tl.zeros((C, BK), dtype=tl.float32)  # do h_n^T: through the entering state
    dk = tl.zeros((C, BK), dtype=tl.float32)  # v dh_n^T: through the leaving state
    dA = tl.zeros((C, C), dtype=tl.float32)  # do v^T: through the within-chunk scores
    for i_v in range(tl.cdiv(V, BV)):
        vv = i_v * BV + tl.arange(0, BV)
        state_offsets = (i_bh * NC + i_n) * K * V + kk[:, None] * V + vv[None, :]
        state_mask = (kk < K)[:, None] & (vv < V)[None, :]
        state = tl.load(h_ptr + state_offsets, mask=state_mask, other=0.0)
        dstate = tl.load(dh_ptr + state_offsets, mask=state_mask, other=0.0)
        do_c = _load_rows(do_ptr, b, h, t, T, H, V, vv, V)
        v_c = _load_rows(v_ptr, b, h, t, T, H, V, vv, V)
        dq += tl.dot(do_c, tl.trans(state), input_precision=PRECISION)
        dk += tl.dot(v_c, tl.trans(dstate), input_precision=PRECISION)
        dA += tl.dot(do_c, tl.trans(v_c), input_precision=PRECISION)
    if STRICT:
        causal = pos[:, None] > pos[None, :]
    else:
        causal = pos[:, None] >= pos[None, :]
    dA = tl.where(causal, dA * scale, 0.0)
    q_c = _load_rows(q_ptr, b, h, t, T, H, K, kk, K)
    k_c = _load_rows(k_ptr, b, h, t, T, H, K, kk, K)
    dq = dq * scale
    if DECAY == 0:
        dq += tl.dot(dA, k_c, input_precision=PRECISION)
        dk += tl.dot(tl.trans(dA), q_c, input_precision=PRECISION)
    if DECAY == 1:
        Gq_c = _load_scalar_decay(Gq_ptr, b, h, t, T, H)
        G_c = _load_scalar_decay(G_ptr, b, h, t, T, H)
        G_last = tl.load(G_ptr + (b * T + last) * H + h).to(tl.float32)
        dq = dq * tl.exp(Gq_c)[:, None]
        dk = dk * tl.exp(tl.minimum(G_last - G_c, 0.0))[:, None]
        dP = dA * tl.exp(tl.minimum(Gq_c[:, None] - G_c[None, :], 0.0))
        dq += tl.dot(dP, k_c, input_precision=PRECISION)
        dk += tl.dot(tl.trans(dP), q_c, input_precision=PRECISION)
    if DECAY == 2:
        Gq_c = _load_rows(Gq_ptr, b, h, t, T, H, K, kk, K)
        G_c = _load_rows(G_ptr, b, h, t, T, H, K, kk, K)
        G_last = tl.load(G_ptr + ((b * T + last) * H + h) * K + kk, mask=kk < K,
                         other=0.0).to(tl.float32)
        dq = dq * tl.exp(Gq_c)
        dk = dk * tl.exp(tl.minimum(G_last[None, :] - G_c, 0.0))
        for s in range(C):  # key column s: pairwise weights, as in _scores_kernel
            row = ((b * T + i_n * C + s) * H + h) * K + kk
            valid = (kk < K) & (kk * 0 + i_n * C + s < T)
            k_s = tl.load(k_ptr + row, mask=valid, other=0.0).to(tl.float32)
            G_s = tl.load(G_ptr + row, mask=valid, other=0.0).to(tl.float32)
            weight = tl.exp(tl.minimum(Gq_c - G_s[None, :], 0.0))
            dA_s = tl.sum(tl.where(pos[None, :] == s, dA, 0.0), axis=1)  # (C,)
            dq += dA_s[:, None] * k_s[None, :] * weight
            dk_s = tl.sum(dA_s[:, None] * q_c * weight, axis=0)  # (BK,)
            dk = tl.where(pos[:, None] == s, dk + dk_s[None, :], dk)
    out = ((b * T + t[:, None]) * H + h) * K + kk[None, :]
    mask = (t < T)[:, None] & (kk < K)[None, :]
    tl.store(dq_ptr + out, dq, mask=mask)
    tl.store(dk_ptr + out, dk, mask=mask)


def _chunk_cumsum(g: torch.Tensor, C: int) -> torch.Tensor:
    """Inclusive cumulative sum of g (B, T, H[, K]) within chunks of C tokens along T."""
    B, T = g.shape[:2]
    pad = (-T) % C
    padded = torch.cat([g, g.new_zeros(B, pad, *g.shape[2:])], 1) if pad else g
    G = padded.view(B, -1, C, *g.shape[2:]).cumsum(2).view(B, T + pad, *g.shape[2:])
    return G[:, :T].contiguous()


class _Plan:
    """Sizes and launch constants shared by the forward and backward launches."""

    def __init__(self, q: torch.Tensor, v: torch.Tensor, decay_mode: int, strict: bool, C: int):
        self.B, self.T, self.H, self.K = q.shape
        self.V = v.shape[-1]
        self.C = C
        self.NC = triton.cdiv(self.T, C)
        self.BK = max(16, triton.next_power_of_2(self.K))
        self.BV = max(16, min(64, triton.next_power_of_2(self.V)))
        self.n_v = triton.cdiv(self.V, self.BV)
        self.decay_mode = decay_mode
        self.strict = strict
        # float32 inputs get exact float32 products; lower precision inputs may use TF32
        self.precision = "ieee" if q.dtype in (torch.float32, torch.float64) else "tf32"

    def constants(self) -> dict:
        return dict(C=self.C, BK=self.BK, DECAY=self.decay_mode, PRECISION=self.precision)


class LinearAttentionFunction(torch.autograd.Function):
    """(q, k, v, g, h0) -> (o in float32, final state in float32), no bonus, no normalize."""

    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, scale: float, strict: bool, chunk_size: int):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        decay_mode = NO_DECAY if g is None else (SCALAR_DECAY if g.dim() == 3 else CHANNEL_DECAY)
        plan = _Plan(q, v, decay_mode, strict, chunk_size)
        B, T, H, K, V, NC, C = plan.B, plan.T, plan.H, plan.K, plan.V, plan.NC, plan.C
        if g is not None:
            G = _chunk_cumsum(g, C)
            Gq = (G - g).contiguous() if strict else G
        else:
            G = Gq = q.new_zeros(1, dtype=torch.float32)  # never read: DECAY == 0
        fp32 = dict(device=q.device, dtype=torch.float32)
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        states = torch.empty(B, H, NC, K, V, **fp32)
        final_state = torch.empty(B, H, K, V, **fp32)
        _state_fwd_kernel[(B * H, plan.n_v)](
            k, v, G, h0 if h0 is not None else final_state, states, final_state,
            T, H, K, V, NC, BV=plan.BV, HAS_H0=h0 is not None, **plan.constants(),
        )
        scores = torch.empty(B, H, NC, C, C, **fp32)
        _scores_kernel[(NC, B * H)](q, k, G, Gq, scores, scale, T, H, K, NC, STRICT=strict,
                                    **plan.constants())
        o = torch.empty(B, T, H, V, **fp32)
        _output_kernel[(NC, B * H, plan.n_v)](q, v, Gq, states, scores, o, scale, T, H, K, V,
                                              NC, BV=plan.BV, **plan.constants())
        ctx.save_for_backward(q, k, v, g, G, Gq, states, scores, final_state, initial_state)
        ctx.plan, ctx.scale = plan, scale
        return o, final_state

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, G, Gq, states, scores, final_state, initial_state = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        B, T, H, K, V, NC = plan.B, plan.T, plan.H, plan.K, plan.V, plan.NC
        do, dht = do.float().contiguous(), dht.float().contiguous()
        fp32 = dict(device=q.device, dtype=torch.float32)
        dstates = torch.empty(B, H, NC, K, V, **fp32)
        dh0 = torch.empty(B, H, K, V, **fp32)
        _state_bwd_kernel[(B * H, plan.n_v)](q, do, Gq, G, dht, dstates, dh0, scale, T, H, K, V,
                                             NC, BV=plan.BV, **plan.constants())
        dv = torch.empty(B, T, H, V, **fp32)
        _dv_kernel[(NC, B * H, plan.n_v)](k, do, G, dstates, scores, dv, T, H, K, V, NC,
                                          BV=plan.BV, **plan.constants())
        dq, dk = torch.empty(B, T, H, K, **fp32), torch.empty(B, T, H, K, **fp32)
        _dqdk_kernel[(NC, B * H)](q, k, v, do, G, Gq, states, dstates, dq, dk, scale,
                                  T, H, K, V, NC, BV=plan.BV, STRICT=plan.strict,
                                  **plan.constants())
        dg = None
        if g is not None and ctx.needs_input_grad[3]:
            dg = _decay_grad(q, k, dq, dk, final_state, dht, plan.strict, g.dim())
        dh0 = dh0.to(initial_state.dtype) if initial_state is not None else None
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg, dh0, None, None, None)


def _decay_grad(q, k, dq, dk, final_state, dht, strict: bool, g_dim: int) -> torch.Tensor:
    """dL/dg from dL/dLambda_t = q_t dq_t - k_t dk_t (+ the final state's term at T - 1).

    Lambda_t = sum_{r <= t} g_r: q_t sees exp(Lambda_t) (exp(Lambda_{t-1}) with a bonus), k_s
    sees exp(-Lambda_s), the final state exp(Lambda_{T-1}); so dg_r = sum_{t >= r} dLambda_t.
    """
    q_side = q.float() * dq
    if strict:  # the query reads S_{t-1}: its term belongs to Lambda_{t-1}; Lambda_{-1} = 0
        q_side = torch.cat([q_side[:, 1:], torch.zeros_like(q_side[:, :1])], 1)
    d_lambda = q_side - k.float() * dk  # (B, T, H, K)
    d_lambda[:, -1] += (final_state * dht).sum(-1)  # (B, H, K)
    if g_dim == 3:
        d_lambda = d_lambda.sum(-1)
    return d_lambda.flip(1).cumsum(1).flip(1)


def linear_attention_triton(
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
    """Same contract as `linear_attention_chunked`; computes in float32 (also for float64)."""
    B, T, H, K = q.shape
    if K > MAX_K:
        raise ValueError(f"linear_attention: backend='triton' supports K <= {MAX_K} key "
                         f"channels per head, got K = {K}; use backend='torch'")
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"linear_attention: backend='triton' needs chunk_size a power of two "
                         f">= 16, got {chunk_size}")
    g = expand_log_decay(decay, B, T, H, K, torch.float32)
    if g is not None:
        g = g.clamp(min=log_decay_floor(torch.float32))
        # the scalar forms stay (B, T, H): one decay per token and head, not K copies
        g = (g[..., 0] if g.shape[-1] == 1 else g).contiguous()
    o, final_state = LinearAttentionFunction.apply(q, k, v, g, initial_state, scale,
                                                   bonus is not None, chunk_size)
    if bonus is not None:
        o = o + _bonus_term(q, k, v, bonus, scale, torch.float32)
    final_state = final_state.to(compute_dtype(q.dtype))  # float64 inputs: a float64 state
    return o.to(output_dtype or q.dtype), (final_state if output_final_state else None)
