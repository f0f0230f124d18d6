"""Fused recurrent Triton kernels for `delta_rule`, forward and backward, in one autograd Function.

This is the fused recurrent form, not the chunked WY form: each program owns one (batch, head)
and a block of BV value columns, keeps its (K, BV) slice of the state in registers and runs
token after token. The delta rule's prediction S^T k reduces over K only, so value columns
are independent and blocks of V need no communication. Per token (A_t the gate):

    S' = A_t S_{t-1};   r = S'^T k_t;   u = beta_t (v_t - r);   S_t = S' + k_t u^T
    o_t = S_t^T (scale q_t)

The forward also writes the state entering every chunk of C tokens (checkpoints). The backward
runs the chunks in reverse: it recomputes the chunk's states forward from its checkpoint into a
per-program scratch buffer (never inverting the update, which is singular at beta |k|^2 = 1),
then walks the chunk backward with the state's gradient dS in registers:

    dS += scale q_t do_t^T;   dq_t = scale S_t do_t;   du = dS^T k_t;   dk_t = dS u
    dv_t = beta_t du;   dbeta_t = du . (v_t - r);   dr = -beta_t du
    dS' = dS + k_t dr^T;   dk_t += S' dr;   dg_t = <dS', S'> (summed per key channel for KDA)
    dS = A_t dS'

dq, dk, dbeta and dg reduce over V, so each V block writes its partial sums and PyTorch adds
them. Tiles hold all K channels (K <= 256); K and V need not be powers of two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..linear_attention.torch_chunked import log_decay_floor
from ..precision import compute_dtype

MAX_K = 256
NO_DECAY, SCALAR_DECAY, CHANNEL_DECAY = 0, 1, 2


@triton.jit
def _load_token(q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, row, t, T, kk, vv, K, V,
                DECAY: tl.constexpr):
    """Token t at `row` = (b T + t) H + h: q, k (BK,), v (BV,), beta and the gate (1 or (BK,));
    zeros (an identity step) where t is past the end."""
    valid = t < T
    # the vector masks compare a vector with T: Triton's interpreter rejects vector & scalar
    k_mask = (kk < K) & (kk * 0 + t < T)
    q_t = tl.load(q_ptr + row * K + kk, mask=k_mask, other=0.0).to(tl.float32)
    k_t = tl.load(k_ptr + row * K + kk, mask=k_mask, other=0.0).to(tl.float32)
    v_t = tl.load(v_ptr + row * V + vv, mask=(vv < V) & (vv * 0 + t < T),
                  other=0.0).to(tl.float32)
    beta_t = tl.load(beta_ptr + row, mask=valid, other=0.0).to(tl.float32)
    if DECAY == 1:
        gate = tl.exp(tl.load(g_ptr + row, mask=valid, other=0.0).to(tl.float32))
    elif DECAY == 2:
        gate = tl.exp(tl.load(g_ptr + row * K + kk, mask=k_mask, other=0.0).to(tl.float32))
    else:
        gate = beta_t * 0.0 + 1.0  # unused without decay; a tensor keeps the return types alike
    return q_t, k_t, v_t, beta_t, gate


@triton.jit
def _apply_gate(S, gate, DECAY: tl.constexpr):
    if DECAY == 1:
        S = S * gate
    elif DECAY == 2:
        S = S * gate[:, None]
    return S


@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, h0_ptr, o_ptr, ht_ptr, checkpoints_ptr, scale,
    T, H, K, V, NC, C,
    BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr, HAS_H0: tl.constexpr,
    SAVE_CHECKPOINTS: tl.constexpr,
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
        if SAVE_CHECKPOINTS:
            tl.store(checkpoints_ptr + (i_bh * NC + n) * K * V + state_offsets, S,
                     mask=state_mask)
        for j in range(C):
            t = n * C + j
            row = (b * T + t) * H + h
            q_t, k_t, v_t, beta_t, gate = _load_token(q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, row,
                                                      t, T, kk, vv, K, V, DECAY)
            S = _apply_gate(S, gate, DECAY)
            predicted = tl.sum(S * k_t[:, None], axis=0)
            S += k_t[:, None] * (beta_t * (v_t - predicted))[None, :]
            o_t = tl.sum(S * q_t[:, None], axis=0) * scale
            tl.store(o_ptr + row * V + vv, o_t, mask=(vv < V) & (vv * 0 + t < T))
    tl.store(ht_ptr + i_bh * K * V + state_offsets, S, mask=state_mask)


@triton.jit
def _backward_kernel(
    q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, checkpoints_ptr, scratch_ptr, do_ptr, dht_ptr,
    dq_ptr, dk_ptr, dv_ptr, dbeta_ptr, dg_ptr, dh0_ptr, scale, B, T, H, K, V, NC, C,
    BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr,
):
    i_bh, i_v = tl.program_id(0), tl.program_id(1)
    NV = tl.num_programs(1)
    b, h = i_bh // H, i_bh % H
    kk = tl.arange(0, BK)
    vv = i_v * BV + tl.arange(0, BV)
    state_offsets = kk[:, None] * V + vv[None, :]
    state_mask = (kk < K)[:, None] & (vv < V)[None, :]
    # this program's C slots of (BK, BV), dense: they never leave the program
    scratch = scratch_ptr + (i_bh * NV + i_v) * C * BK * BV
    tile = kk[:, None] * BV + tl.arange(0, BV)[None, :]
    dS = tl.load(dht_ptr + i_bh * K * V + state_offsets, mask=state_mask,
                 other=0.0).to(tl.float32)
    for i_n in range(NC):
        n = NC - 1 - i_n
        S = tl.load(checkpoints_ptr + (i_bh * NC + n) * K * V + state_offsets, mask=state_mask,
                    other=0.0)
        for j in range(C):  # recompute the states entering each token of the chunk
            t = n * C + j
            row = (b * T + t) * H + h
            tl.store(scratch + j * BK * BV + tile, S)
            q_t, k_t, v_t, beta_t, gate = _load_token(q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, row,
                                                      t, T, kk, vv, K, V, DECAY)
            S = _apply_gate(S, gate, DECAY)
            predicted = tl.sum(S * k_t[:, None], axis=0)
            S += k_t[:, None] * (beta_t * (v_t - predicted))[None, :]
        tl.debug_barrier()
        for i_j in range(C):
            j = C - 1 - i_j
            t = n * C + j
            valid = t < T
            row = (b * T + t) * H + h
            q_t, k_t, v_t, beta_t, gate = _load_token(q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, row,
                                                      t, T, kk, vv, K, V, DECAY)
            S_gated = _apply_gate(tl.load(scratch + j * BK * BV + tile), gate, DECAY)
            residual = v_t - tl.sum(S_gated * k_t[:, None], axis=0)
            update = beta_t * residual
            S_t = S_gated + k_t[:, None] * update[None, :]
            v_mask = (vv < V) & (vv * 0 + t < T)
            do_t = tl.load(do_ptr + row * V + vv, mask=v_mask, other=0.0)
            dS += (scale * q_t)[:, None] * do_t[None, :]
            dq_t = scale * tl.sum(S_t * do_t[None, :], axis=1)
            d_update = tl.sum(dS * k_t[:, None], axis=0)  # (BV,)
            dk_t = tl.sum(dS * update[None, :], axis=1)
            d_predicted = -beta_t * d_update
            dS_gated = dS + k_t[:, None] * d_predicted[None, :]
            dk_t += tl.sum(S_gated * d_predicted[None, :], axis=1)
            partial_row = i_v * B * T * H + row  # this V block's partial sums
            k_mask = (kk < K) & (kk * 0 + t < T)
            tl.store(dv_ptr + row * V + vv, beta_t * d_update, mask=v_mask)
            tl.store(dq_ptr + partial_row * K + kk, dq_t, mask=k_mask)
            tl.store(dk_ptr + partial_row * K + kk, dk_t, mask=k_mask)
            tl.store(dbeta_ptr + partial_row, tl.sum(d_update * residual, axis=0), mask=valid)
            if DECAY == 1:
                tl.store(dg_ptr + partial_row, tl.sum(tl.sum(dS_gated * S_gated, axis=1), axis=0),
                         mask=valid)
            if DECAY == 2:
                tl.store(dg_ptr + partial_row * K + kk, tl.sum(dS_gated * S_gated, axis=1),
                         mask=k_mask)
            dS = _apply_gate(dS_gated, gate, DECAY)
        tl.debug_barrier()  # the next chunk overwrites the scratch slots
    tl.store(dh0_ptr + i_bh * K * V + state_offsets, dS, mask=state_mask)


def _blocks(K: int, V: int) -> tuple[int, int]:
    """(BK, BV): all of K, and a block of V that keeps the tile at <= 8192 floats."""
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, min(64, 8192 // BK, triton.next_power_of_2(V)))
    return BK, BV


class DeltaRuleFunction(torch.autograd.Function):
    """(q, k, v, beta, g, h0) -> (o, final state), both float32; g already floored."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, initial_state, scale: float, chunk_size: int):
        q, k, v, beta = q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous()
        g = g.contiguous() if g is not None else None
        B, T, H, K = q.shape
        V = v.shape[-1]
        BK, BV = _blocks(K, V)
        NC = triton.cdiv(T, chunk_size)
        decay_mode = NO_DECAY if g is None else (SCALAR_DECAY if g.dim() == 3 else CHANNEL_DECAY)
        fp32 = dict(device=q.device, dtype=torch.float32)
        h0 = initial_state.contiguous() if initial_state is not None else None
        save = any(ctx.needs_input_grad[:6])
        o = torch.empty(B, T, H, V, **fp32)
        final_state = torch.empty(B, H, K, V, **fp32)
        checkpoints = torch.empty(B, H, NC, K, V, **fp32) if save else final_state
        _forward_kernel[(B * H, triton.cdiv(V, BV))](
            q, k, v, beta, g if g is not None else beta, h0 if h0 is not None else final_state,
            o, final_state, checkpoints, scale, T, H, K, V, NC, chunk_size,
            BK=BK, BV=BV, DECAY=decay_mode, HAS_H0=h0 is not None, SAVE_CHECKPOINTS=save,
        )
        ctx.save_for_backward(q, k, v, beta, g, initial_state, checkpoints)
        ctx.scale, ctx.chunk_size, ctx.decay_mode = scale, chunk_size, decay_mode
        return o, final_state

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, g, initial_state, checkpoints = ctx.saved_tensors
        B, T, H, K = q.shape
        V = v.shape[-1]
        BK, BV = _blocks(K, V)
        NV = triton.cdiv(V, BV)
        C = ctx.chunk_size
        NC = checkpoints.shape[2]
        fp32 = dict(device=q.device, dtype=torch.float32)
        do, dht = do.float().contiguous(), dht.float().contiguous()
        scratch = torch.empty(B * H * NV * C * BK * BV, **fp32)
        dq, dk = torch.empty(NV, B, T, H, K, **fp32), torch.empty(NV, B, T, H, K, **fp32)
        dv = torch.empty(B, T, H, V, **fp32)
        dbeta = torch.empty(NV, B, T, H, **fp32)
        dg = torch.empty(NV, *g.shape, **fp32) if g is not None else dbeta
        dh0 = torch.empty(B, H, K, V, **fp32)
        _backward_kernel[(B * H, NV)](
            q, k, v, beta, g if g is not None else beta, checkpoints, scratch, do, dht,
            dq, dk, dv, dbeta, dg, dh0, ctx.scale, B, T, H, K, V, NC, C,
            BK=BK, BV=BV, DECAY=ctx.decay_mode,
        )
        dg = dg.sum(0).to(g.dtype) if g is not None else None
        dh0 = dh0.to(initial_state.dtype) if initial_state is not None else None
        return (dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype), dv.to(v.dtype),
                dbeta.sum(0).to(beta.dtype), dg, dh0, None, None)


def delta_rule_triton(
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
    """Same contract as `delta_rule_chunked`; computes in float32 (also for float64).
    `chunk_size` is the spacing of the backward's state checkpoints."""
    K = q.shape[-1]
    if K > MAX_K:
        raise ValueError(f"delta_rule: backend='triton' supports K <= {MAX_K} key channels "
                         f"per head, got K = {K}; use backend='torch'")
    g = None
    if decay is not None:
        g = decay.float().clamp(min=log_decay_floor(torch.float32))
    o, final_state = DeltaRuleFunction.apply(q, k, v, beta, g, initial_state, float(scale),
                                             chunk_size)
    final_state = final_state.to(compute_dtype(q.dtype))  # float64 inputs: a float64 state
    return o.to(q.dtype), (final_state if output_final_state else None)
