"""Fused recurrent Triton kernels for `generalized_delta_rule`, forward and backward, in one
autograd Function, laid out as `triton_kernels.py` lays out the delta rule's.

Each program owns one (batch, head) and a block of BV value columns, keeps its (K, BV) slice of
the state in registers and runs token after token. The read a_t^T S reduces over K only, so
value columns stay independent and blocks of V need no communication. Per token (A_t =
Diag(exp(g_t)), or a scalar, or I):

    r = S_{t-1}^T a_t;   S_t = A_t S_{t-1} + b_t r^T + k_t v_t^T;   o_t = S_t^T (scale q_t)

The forward writes the state entering every chunk of C tokens (checkpoints). The backward runs
the chunks in reverse: it recomputes the chunk's states forward from its checkpoint into a
per-program scratch buffer (the transition need not be invertible: a gate of 0 erases), then
walks the chunk backward with the state's gradient dS in registers:

    dS += scale q_t do_t^T;   dq_t = scale S_t do_t;   dk_t = dS v_t;   dv_t = dS^T k_t
    db_t = dS r;   dr = dS^T b_t;   da_t = S_{t-1} dr
    dg_t = A_t <dS, S_{t-1}> (per key channel, or summed for a scalar gate)
    dS = A_t dS + a_t dr^T

dq, dk, da, db and dg reduce over V, so each V block writes its partial sums and PyTorch adds
them. Everything computes in the op's compute dtype (float64 for float64 inputs, float32
otherwise), the scale included: Triton would pass a Python float as float32. Tiles hold all K
channels (K <= 256); K and V need not be powers of two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..linear_attention.torch_chunked import log_decay_floor
from ..precision import compute_dtype
from .triton_kernels import CHANNEL_DECAY, MAX_K, NO_DECAY, SCALAR_DECAY, _apply_gate, _blocks

TRITON_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _load_token(q_ptr, k_ptr, v_ptr, a_ptr, b_ptr, g_ptr, row, t, T, kk, vv, K, V,
                DECAY: tl.constexpr, ACC: tl.constexpr):
    """Token t at `row` = (b T + t) H + h: q, k, a, b (BK,), v (BV,) and the gate (1 or (BK,)),
    in ACC; zeros and a gate of 1 (an identity step) where t is past the end."""
    # the vector masks compare a vector with T: Triton's interpreter rejects vector & scalar
    k_mask = (kk < K) & (kk * 0 + t < T)
    q_t = tl.load(q_ptr + row * K + kk, mask=k_mask, other=0.0).to(ACC)
    k_t = tl.load(k_ptr + row * K + kk, mask=k_mask, other=0.0).to(ACC)
    a_t = tl.load(a_ptr + row * K + kk, mask=k_mask, other=0.0).to(ACC)
    b_t = tl.load(b_ptr + row * K + kk, mask=k_mask, other=0.0).to(ACC)
    v_t = tl.load(v_ptr + row * V + vv, mask=(vv < V) & (vv * 0 + t < T), other=0.0).to(ACC)
    if DECAY == 1:
        gate = tl.exp(tl.load(g_ptr + row, mask=t < T, other=0.0).to(ACC))
    elif DECAY == 2:
        gate = tl.exp(tl.load(g_ptr + row * K + kk, mask=k_mask, other=0.0).to(ACC))
    else:
        gate = q_t * 0.0 + 1.0  # unused without decay; a tensor keeps the return types alike
    return q_t, k_t, v_t, a_t, b_t, gate


@triton.jit
def _step(S, k_t, v_t, a_t, b_t, gate, DECAY: tl.constexpr):
    """The read r = S^T a and the state after the token: A S + b r^T + k v^T."""
    read = tl.sum(S * a_t[:, None], axis=0)
    S_next = (_apply_gate(S, gate, DECAY) + b_t[:, None] * read[None, :]
              + k_t[:, None] * v_t[None, :])
    return read, S_next


@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, v_ptr, a_ptr, b_ptr, g_ptr, h0_ptr, o_ptr, ht_ptr, checkpoints_ptr, scale_ptr,
    T, H, K, V, NC, C,
    BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr, HAS_H0: tl.constexpr,
    SAVE_CHECKPOINTS: tl.constexpr, ACC: tl.constexpr,
):
    i_bh, i_v = tl.program_id(0), tl.program_id(1)
    b, h = i_bh // H, i_bh % H
    kk = tl.arange(0, BK)
    vv = i_v * BV + tl.arange(0, BV)
    state_offsets = kk[:, None] * V + vv[None, :]
    state_mask = (kk < K)[:, None] & (vv < V)[None, :]
    scale = tl.load(scale_ptr).to(ACC)
    if HAS_H0:
        S = tl.load(h0_ptr + i_bh * K * V + state_offsets, mask=state_mask, other=0.0).to(ACC)
    else:
        S = tl.zeros((BK, BV), dtype=ACC)
    for n in range(NC):
        if SAVE_CHECKPOINTS:
            tl.store(checkpoints_ptr + (i_bh * NC + n) * K * V + state_offsets, S,
                     mask=state_mask)
        for j in range(C):
            t = n * C + j
            row = (b * T + t) * H + h
            q_t, k_t, v_t, a_t, b_t, gate = _load_token(q_ptr, k_ptr, v_ptr, a_ptr, b_ptr,
                                                        g_ptr, row, t, T, kk, vv, K, V,
                                                        DECAY, ACC)
            _, S = _step(S, k_t, v_t, a_t, b_t, gate, DECAY)
            o_t = tl.sum(S * q_t[:, None], axis=0) * scale
            tl.store(o_ptr + row * V + vv, o_t, mask=(vv < V) & (vv * 0 + t < T))
    tl.store(ht_ptr + i_bh * K * V + state_offsets, S, mask=state_mask)


@triton.jit
def _backward_kernel(
    q_ptr, k_ptr, v_ptr, a_ptr, b_ptr, g_ptr, checkpoints_ptr, scratch_ptr, do_ptr, dht_ptr,
    dq_ptr, dk_ptr, dv_ptr, da_ptr, db_ptr, dg_ptr, dh0_ptr, scale_ptr, B, T, H, K, V, NC, C,
    BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr, ACC: tl.constexpr,
):
    i_bh, i_v = tl.program_id(0), tl.program_id(1)
    NV = tl.num_programs(1)
    b, h = i_bh // H, i_bh % H
    kk = tl.arange(0, BK)
    vv = i_v * BV + tl.arange(0, BV)
    state_offsets = kk[:, None] * V + vv[None, :]
    state_mask = (kk < K)[:, None] & (vv < V)[None, :]
    scale = tl.load(scale_ptr).to(ACC)
    # this program's C slots of (BK, BV), dense: they never leave the program
    scratch = scratch_ptr + (i_bh * NV + i_v) * C * BK * BV
    tile = kk[:, None] * BV + tl.arange(0, BV)[None, :]
    dS = tl.load(dht_ptr + i_bh * K * V + state_offsets, mask=state_mask, other=0.0).to(ACC)
    for i_n in range(NC):
        n = NC - 1 - i_n
        S = tl.load(checkpoints_ptr + (i_bh * NC + n) * K * V + state_offsets, mask=state_mask,
                    other=0.0)
        for j in range(C):  # recompute the states entering each token of the chunk
            t = n * C + j
            row = (b * T + t) * H + h
            tl.store(scratch + j * BK * BV + tile, S)
            q_t, k_t, v_t, a_t, b_t, gate = _load_token(q_ptr, k_ptr, v_ptr, a_ptr, b_ptr,
                                                        g_ptr, row, t, T, kk, vv, K, V,
                                                        DECAY, ACC)
            _, S = _step(S, k_t, v_t, a_t, b_t, gate, DECAY)
        tl.debug_barrier()
        for i_j in range(C):
            j = C - 1 - i_j
            t = n * C + j
            row = (b * T + t) * H + h
            q_t, k_t, v_t, a_t, b_t, gate = _load_token(q_ptr, k_ptr, v_ptr, a_ptr, b_ptr,
                                                        g_ptr, row, t, T, kk, vv, K, V,
                                                        DECAY, ACC)
            S_prev = tl.load(scratch + j * BK * BV + tile)
            read, S_t = _step(S_prev, k_t, v_t, a_t, b_t, gate, DECAY)
            v_mask = (vv < V) & (vv * 0 + t < T)
            do_t = tl.load(do_ptr + row * V + vv, mask=v_mask, other=0.0).to(ACC)
            dS += (scale * q_t)[:, None] * do_t[None, :]
            dq_t = scale * tl.sum(S_t * do_t[None, :], axis=1)
            dk_t = tl.sum(dS * v_t[None, :], axis=1)
            db_t = tl.sum(dS * read[None, :], axis=1)
            d_read = tl.sum(dS * b_t[:, None], axis=0)  # (BV,)
            da_t = tl.sum(S_prev * d_read[None, :], axis=1)
            partial_row = i_v * B * T * H + row  # this V block's partial sums
            k_mask = (kk < K) & (kk * 0 + t < T)
            tl.store(dv_ptr + row * V + vv, tl.sum(dS * k_t[:, None], axis=0), mask=v_mask)
            tl.store(dq_ptr + partial_row * K + kk, dq_t, mask=k_mask)
            tl.store(dk_ptr + partial_row * K + kk, dk_t, mask=k_mask)
            tl.store(da_ptr + partial_row * K + kk, da_t, mask=k_mask)
            tl.store(db_ptr + partial_row * K + kk, db_t, mask=k_mask)
            if DECAY == 1:
                dg_t = gate * tl.sum(tl.sum(dS * S_prev, axis=1), axis=0)
                tl.store(dg_ptr + partial_row, dg_t, mask=t < T)
            if DECAY == 2:
                tl.store(dg_ptr + partial_row * K + kk, gate * tl.sum(dS * S_prev, axis=1),
                         mask=k_mask)
            dS = _apply_gate(dS, gate, DECAY) + a_t[:, None] * d_read[None, :]
        tl.debug_barrier()  # the next chunk overwrites the scratch slots
    tl.store(dh0_ptr + i_bh * K * V + state_offsets, dS, mask=state_mask)


class GeneralizedDeltaRuleFunction(torch.autograd.Function):
    """(q, k, v, a, b, g, h0) -> (o, final state), both in the compute dtype; g already floored
    and in the compute dtype."""

    @staticmethod
    def forward(ctx, q, k, v, a, b, g, initial_state, scale: float, chunk_size: int):
        q, k, v, a, b = (x.contiguous() for x in (q, k, v, a, b))
        g = g.contiguous() if g is not None else None
        B, T, H, K = q.shape
        V = v.shape[-1]
        BK, BV = _blocks(K, V)
        NC = triton.cdiv(T, chunk_size)
        decay_mode = NO_DECAY if g is None else (SCALAR_DECAY if g.dim() == 3 else CHANNEL_DECAY)
        acc = dict(device=q.device, dtype=compute_dtype(q.dtype))
        h0 = initial_state.contiguous() if initial_state is not None else None
        save = any(ctx.needs_input_grad[:7])
        scale_tensor = torch.full((1,), scale, **acc)
        o = torch.empty(B, T, H, V, **acc)
        final_state = torch.empty(B, H, K, V, **acc)
        checkpoints = torch.empty(B, H, NC, K, V, **acc) if save else final_state
        _forward_kernel[(B * H, triton.cdiv(V, BV))](
            q, k, v, a, b, g if g is not None else q, h0 if h0 is not None else final_state,
            o, final_state, checkpoints, scale_tensor, T, H, K, V, NC, chunk_size,
            BK=BK, BV=BV, DECAY=decay_mode, HAS_H0=h0 is not None, SAVE_CHECKPOINTS=save,
            ACC=TRITON_DTYPES[acc["dtype"]],
        )
        ctx.save_for_backward(q, k, v, a, b, g, initial_state, checkpoints, scale_tensor)
        ctx.chunk_size, ctx.decay_mode = chunk_size, decay_mode
        return o, final_state

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, a, b, g, initial_state, checkpoints, scale_tensor = ctx.saved_tensors
        B, T, H, K = q.shape
        V = v.shape[-1]
        BK, BV = _blocks(K, V)
        NV = triton.cdiv(V, BV)
        C = ctx.chunk_size
        NC = checkpoints.shape[2]
        acc = dict(device=q.device, dtype=compute_dtype(q.dtype))
        do, dht = do.to(acc["dtype"]).contiguous(), dht.to(acc["dtype"]).contiguous()
        scratch = torch.empty(B * H * NV * C * BK * BV, **acc)
        dq, dk, da, db = (torch.empty(NV, B, T, H, K, **acc) for _ in range(4))
        dv = torch.empty(B, T, H, V, **acc)
        dg = torch.empty(NV, *g.shape, **acc) if g is not None else dv
        dh0 = torch.empty(B, H, K, V, **acc)
        _backward_kernel[(B * H, NV)](
            q, k, v, a, b, g if g is not None else q, checkpoints, scratch, do, dht,
            dq, dk, dv, da, db, dg, dh0, scale_tensor, B, T, H, K, V, NC, C,
            BK=BK, BV=BV, DECAY=ctx.decay_mode, ACC=TRITON_DTYPES[acc["dtype"]],
        )
        dg = dg.sum(0).to(g.dtype) if g is not None else None
        dh0 = dh0.to(initial_state.dtype) if initial_state is not None else None
        return (dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype), dv.to(v.dtype),
                da.sum(0).to(a.dtype), db.sum(0).to(b.dtype), dg, dh0, None, None)


def generalized_delta_rule_triton(
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
    """Same contract as `generalized_delta_rule_chunked`; computes in float32 (float64 for
    float64 inputs). `chunk_size` is the spacing of the backward's state checkpoints."""
    K = q.shape[-1]
    if K > MAX_K:
        raise ValueError(f"generalized_delta_rule: backend='triton' supports K <= {MAX_K} key "
                         f"channels per head, got K = {K}; use backend='torch'")
    dtype = compute_dtype(q.dtype)
    g = None
    if decay is not None:
        g = decay.to(dtype).clamp(min=log_decay_floor(dtype))
    o, final_state = GeneralizedDeltaRuleFunction.apply(q, k, v, a, b, g, initial_state,
                                                        float(scale), chunk_size)
    return o.to(q.dtype), (final_state if output_final_state else None)
