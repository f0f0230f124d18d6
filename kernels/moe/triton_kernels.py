"""Triton grouped matmuls over stacked expert weights, forward and backward, in one autograd
Function.

The N * K token slots are sorted by expert once (`sort_slots_by_expert`); no permuted copy of
x is made: every kernel gathers its rows of x (or of dy) through the sorted slot order, in place.
The work is cut into row tiles of one expert each (a tile never straddles two experts, so it
reads one expert's weights); `_tile_schedule` builds that list on the device, without a host
sync, for an upper bound of tiles (the spare ones have no rows and store nothing).

Forward, with G = gate_up_proj[e] and W = down_proj[e] for the slots of expert e:
    gu  = x[tok] @ G^T                        (_up_kernel; kept, permuted, for backward)
    y_s = weight_s * act(gu) @ W^T            (_down_kernel; act applied on the fly from gu)
    y   = sum over a token's K slots of y_s   (scattered to slot rows, so no atomics)
Backward:
    g   = dy[tok] @ W;  dweight_s = <g, act(gu)>;  dgu = act'(gu) * weight_s * g   (_dgu_kernel)
    dx  = sum over slots of dgu @ G                                                (_dx_kernel)
    dG  = dgu^T @ x[tok],  dW = (weight * dy[tok])^T @ act(gu), per expert    (_dweight kernels)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreted
from .torch_fast import sort_slots_by_expert


@triton.jit
def _tile_rows(tile_expert_ptr, tile_start_ptr, tile_stop_ptr, order_ptr, pid, K,
               BLOCK_M: tl.constexpr):
    e = tl.load(tile_expert_ptr + pid)
    r0 = tl.load(tile_start_ptr + pid)
    r1 = tl.load(tile_stop_ptr + pid)
    rows = r0 + tl.arange(0, BLOCK_M)  # positions in the expert-sorted slot order
    mask_m = rows < r1
    slots = tl.load(order_ptr + rows, mask=mask_m, other=0)
    return e, rows, mask_m, slots, slots // K


@triton.jit
def _activation(gu_ptr, rows, cols, mask, I, SWIGLU: tl.constexpr):
    """act(gu) for a (rows, cols) tile: silu(gate) * up (gate first, as Mixtral) or gelu."""
    if SWIGLU:
        base = gu_ptr + rows[:, None] * (2 * I) + cols[None, :]
        g = tl.load(base, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(base + I, mask=mask, other=0.0).to(tl.float32)
        h = g * tl.sigmoid(g) * u
    else:
        a = tl.load(gu_ptr + rows[:, None] * I + cols[None, :], mask=mask, other=0.0)
        a = a.to(tl.float32)
        h = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))
    return h


@triton.jit
def _up_kernel(
    x_ptr, w_ptr, order_ptr, tile_expert_ptr, tile_start_ptr, tile_stop_ptr, gu_ptr, D, I, K,
    SWIGLU: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    e, rows, mask_m, slots, tok = _tile_rows(tile_expert_ptr, tile_start_ptr, tile_stop_ptr,
                                             order_ptr, tl.program_id(0), K, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = cols < I
    GU = 2 * I if SWIGLU else I
    acc_g = tl.zeros((BLOCK_M, BLOCK_I), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_I), dtype=tl.float32)
    w_e = w_ptr + e.to(tl.int64) * GU * D
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask_d = d < D
        xb = tl.load(x_ptr + tok[:, None] * D + d[None, :], mask=mask_m[:, None] & mask_d[None, :],
                     other=0.0).to(tl.float32)
        w_mask = mask_d[:, None] & mask_i[None, :]
        wg = tl.load(w_e + cols[None, :] * D + d[:, None], mask=w_mask, other=0.0).to(tl.float32)
        acc_g = tl.dot(xb.to(DOT), wg.to(DOT), acc_g, input_precision="ieee")
        if SWIGLU:
            wu = tl.load(w_e + (cols + I)[None, :] * D + d[:, None], mask=w_mask, other=0.0)
            acc_u = tl.dot(xb.to(DOT), wu.to(DOT), acc_u, input_precision="ieee")
    out_mask = mask_m[:, None] & mask_i[None, :]
    out = gu_ptr + rows[:, None] * GU + cols[None, :]
    tl.store(out, acc_g.to(gu_ptr.dtype.element_ty), mask=out_mask)
    if SWIGLU:
        tl.store(out + I, acc_u.to(gu_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _down_kernel(
    gu_ptr, w_ptr, weights_ptr, order_ptr, tile_expert_ptr, tile_start_ptr, tile_stop_ptr,
    y_slots_ptr, D, I, K,
    SWIGLU: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    e, rows, mask_m, slots, tok = _tile_rows(tile_expert_ptr, tile_start_ptr, tile_stop_ptr,
                                             order_ptr, tl.program_id(0), K, BLOCK_M)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = d < D
    w_e = w_ptr + e.to(tl.int64) * D * I
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for i0 in range(0, I, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        mask_i = i < I
        h = _activation(gu_ptr, rows, i, mask_m[:, None] & mask_i[None, :], I, SWIGLU)
        wd = tl.load(w_e + d[None, :] * I + i[:, None], mask=mask_i[:, None] & mask_d[None, :],
                     other=0.0).to(tl.float32)
        acc = tl.dot(h.to(DOT), wd.to(DOT), acc, input_precision="ieee")
    gate_weight = tl.load(weights_ptr + slots, mask=mask_m, other=0.0).to(tl.float32)
    acc = acc * gate_weight[:, None]
    tl.store(y_slots_ptr + slots[:, None] * D + d[None, :],
             acc.to(y_slots_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _dgu_kernel(
    dy_ptr, gu_ptr, w_ptr, weights_ptr, order_ptr, tile_expert_ptr, tile_start_ptr,
    tile_stop_ptr, dgu_ptr, dweight_partial_ptr, D, I, K, NK,
    SWIGLU: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_i = tl.program_id(1)
    e, rows, mask_m, slots, tok = _tile_rows(tile_expert_ptr, tile_start_ptr, tile_stop_ptr,
                                             order_ptr, tl.program_id(0), K, BLOCK_M)
    i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = i < I
    w_e = w_ptr + e.to(tl.int64) * D * I
    g = tl.zeros((BLOCK_M, BLOCK_I), dtype=tl.float32)  # dL/d act(gu), before the gate weight
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask_d = d < D
        dyb = tl.load(dy_ptr + tok[:, None] * D + d[None, :],
                      mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        wd = tl.load(w_e + d[:, None] * I + i[None, :], mask=mask_d[:, None] & mask_i[None, :],
                     other=0.0).to(tl.float32)
        g = tl.dot(dyb.to(DOT), wd.to(DOT), g, input_precision="ieee")
    mask = mask_m[:, None] & mask_i[None, :]
    h = _activation(gu_ptr, rows, i, mask, I, SWIGLU)
    # y_s = w_s * h @ W^T, so dL/dw_s = <dy, h @ W^T> = <dy @ W, h>: no second matmul needed;
    # each I-tile writes its partial sum, the host adds the tiles
    tl.store(dweight_partial_ptr + pid_i * NK + slots, tl.sum(g * h, axis=1), mask=mask_m)
    gate_weight = tl.load(weights_ptr + slots, mask=mask_m, other=0.0).to(tl.float32)
    dh = g * gate_weight[:, None]
    if SWIGLU:
        base = gu_ptr + rows[:, None] * (2 * I) + i[None, :]
        a = tl.load(base, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(base + I, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(a)
        # d silu(a) / da = sig * (1 + a * (1 - sig))
        out = dgu_ptr + rows[:, None] * (2 * I) + i[None, :]
        tl.store(out, dh * u * sig * (1.0 + a * (1.0 - sig)), mask=mask)
        tl.store(out + I, dh * a * sig, mask=mask)
    else:
        a = tl.load(gu_ptr + rows[:, None] * I + i[None, :], mask=mask, other=0.0).to(tl.float32)
        # d gelu(a) / da = Phi(a) + a * phi(a)
        dgelu = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476)) + (
            a * 0.3989422804014327 * tl.exp(-0.5 * a * a))
        tl.store(dgu_ptr + rows[:, None] * I + i[None, :], dh * dgelu, mask=mask)


@triton.jit
def _dx_kernel(
    dgu_ptr, w_ptr, order_ptr, tile_expert_ptr, tile_start_ptr, tile_stop_ptr, dx_slots_ptr,
    D, GU, K, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    e, rows, mask_m, slots, tok = _tile_rows(tile_expert_ptr, tile_start_ptr, tile_stop_ptr,
                                             order_ptr, tl.program_id(0), K, BLOCK_M)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = d < D
    w_e = w_ptr + e.to(tl.int64) * GU * D
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for j0 in range(0, GU, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        mask_j = j < GU
        a = tl.load(dgu_ptr + rows[:, None] * GU + j[None, :],
                    mask=mask_m[:, None] & mask_j[None, :], other=0.0)
        w = tl.load(w_e + j[:, None] * D + d[None, :], mask=mask_j[:, None] & mask_d[None, :],
                    other=0.0).to(tl.float32)
        acc = tl.dot(a.to(DOT), w.to(DOT), acc, input_precision="ieee")
    tl.store(dx_slots_ptr + slots[:, None] * D + d[None, :], acc,
             mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _dgate_up_weight_kernel(
    dgu_ptr, x_ptr, order_ptr, offsets_ptr, dw_ptr, D, GU, K,
    DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # dG[e] = dgu_e^T @ x[tok_e]: one program per (expert, J tile, D tile), looping over the
    # expert's rows, whose count is only known on the device
    e = tl.program_id(0)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_j, mask_d = j < GU, d < D
    r0 = tl.load(offsets_ptr + e)
    r1 = tl.load(offsets_ptr + e + 1)
    acc = tl.zeros((BLOCK_J, BLOCK_D), dtype=tl.float32)
    for r in range(r0, r1, BLOCK_M):
        rows = r + tl.arange(0, BLOCK_M)
        mask_m = rows < r1
        tok = tl.load(order_ptr + rows, mask=mask_m, other=0) // K
        a_t = tl.load(dgu_ptr + rows[None, :] * GU + j[:, None],
                      mask=mask_j[:, None] & mask_m[None, :], other=0.0)  # (J, M)
        xb = tl.load(x_ptr + tok[:, None] * D + d[None, :],
                     mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(a_t.to(DOT), xb.to(DOT), acc, input_precision="ieee")
    tl.store(dw_ptr + e.to(tl.int64) * GU * D + j[:, None] * D + d[None, :],
             acc.to(dw_ptr.dtype.element_ty), mask=mask_j[:, None] & mask_d[None, :])


@triton.jit
def _ddown_weight_kernel(
    dy_ptr, gu_ptr, weights_ptr, order_ptr, offsets_ptr, dw_ptr, D, I, K,
    SWIGLU: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # dW[e] = (weight * dy[tok_e])^T @ act(gu_e)
    e = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    i = tl.program_id(2) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_d, mask_i = d < D, i < I
    r0 = tl.load(offsets_ptr + e)
    r1 = tl.load(offsets_ptr + e + 1)
    acc = tl.zeros((BLOCK_D, BLOCK_I), dtype=tl.float32)
    for r in range(r0, r1, BLOCK_M):
        rows = r + tl.arange(0, BLOCK_M)
        mask_m = rows < r1
        slots = tl.load(order_ptr + rows, mask=mask_m, other=0)
        tok = slots // K
        gate_weight = tl.load(weights_ptr + slots, mask=mask_m, other=0.0).to(tl.float32)
        dy_t = tl.load(dy_ptr + tok[None, :] * D + d[:, None],
                       mask=mask_d[:, None] & mask_m[None, :], other=0.0).to(tl.float32)
        h = _activation(gu_ptr, rows, i, mask_m[:, None] & mask_i[None, :], I, SWIGLU)
        acc = tl.dot((dy_t * gate_weight[None, :]).to(DOT), h.to(DOT), acc,
                     input_precision="ieee")
    tl.store(dw_ptr + e.to(tl.int64) * D * I + d[:, None] * I + i[None, :],
             acc.to(dw_ptr.dtype.element_ty), mask=mask_d[:, None] & mask_i[None, :])


def _block(n: int, cap: int) -> int:
    # tl.dot needs every block dim >= 16
    return max(16, min(cap, triton.next_power_of_2(n)))


def _tile_schedule(counts: torch.Tensor, block_m: int, n_slots: int):
    """Row tiles of one expert each, built on the device (no host sync).

    counts: (E,) slots per expert. Returns (tile_expert, tile_start, tile_stop, offsets):
    per tile its expert and its [start, stop) range in the expert-sorted slot order, for an
    upper bound of cdiv(n_slots, block_m) + E tiles (spare tiles get an empty range), and
    offsets (E + 1,) where each expert's rows begin.
    """
    E = counts.shape[0]
    offsets = torch.zeros(E + 1, dtype=torch.int64, device=counts.device)
    offsets[1:] = torch.cumsum(counts, 0)
    tiles = (counts + block_m - 1) // block_m
    tiles_end = torch.cumsum(tiles, 0)
    # sum_e ceil(c_e / m) <= sum_e (c_e / m + 1)
    t = torch.arange(triton.cdiv(n_slots, block_m) + E, device=counts.device)
    expert = torch.searchsorted(tiles_end, t, right=True)  # == E for spare tiles
    spare = expert >= E
    expert = expert.clamp(max=E - 1)
    local = t - (tiles_end - tiles)[expert]
    start = offsets[expert] + local * block_m
    stop = torch.minimum(start + block_m, offsets[expert + 1])
    start = torch.where(spare, 0, start)
    stop = torch.where(spare, 0, stop)
    return expert.contiguous(), start.contiguous(), stop.contiguous(), offsets


def _dot_dtype(dtype: torch.dtype):
    """Operand type of tl.dot: bf16 / fp16 inputs go to the tensor cores as they are (fp32
    accumulation); fp32 stays exact fp32 ("ieee", not tf32). The interpreter always gets fp32:
    numpy has no bf16 arithmetic."""
    if triton_interpreted() or dtype not in (torch.bfloat16, torch.float16):
        return tl.float32
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16


def _blocks(D: int, I: int) -> tuple[int, int, int]:
    if triton_interpreted():
        return 16, _block(I, 32), _block(D, 32)  # the interpreter pays per element, not per tile
    return 64, _block(I, 64), _block(D, 64)


class MoEExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate_up_proj, down_proj, expert_ids, weights, swiglu: bool):
        N, D = x.shape
        K = expert_ids.shape[1]
        E, GU, _ = gate_up_proj.shape
        I = down_proj.shape[2]
        x, gate_up_proj = x.contiguous(), gate_up_proj.contiguous()
        down_proj = down_proj.contiguous()
        flat_weights = weights.reshape(-1).contiguous()
        order, counts = sort_slots_by_expert(expert_ids, E)
        block_m, block_i, block_d = _blocks(D, I)
        dot = _dot_dtype(x.dtype)
        tile_expert, tile_start, tile_stop, offsets = _tile_schedule(counts, block_m, N * K)
        n_tiles = tile_expert.shape[0]
        gu = torch.empty(N * K, GU, device=x.device, dtype=x.dtype)
        _up_kernel[(n_tiles, triton.cdiv(I, block_i))](
            x, gate_up_proj, order, tile_expert, tile_start, tile_stop, gu, D, I, K,
            SWIGLU=swiglu, DOT=dot, BLOCK_M=block_m, BLOCK_I=block_i, BLOCK_D=block_d,
        )
        # slot rows of dropped slots (id -1) are never written, so they stay zero
        y_slots = torch.zeros(N * K, D, device=x.device, dtype=x.dtype)
        _down_kernel[(n_tiles, triton.cdiv(D, block_d))](
            gu, down_proj, flat_weights, order, tile_expert, tile_start, tile_stop, y_slots,
            D, I, K, SWIGLU=swiglu, DOT=dot, BLOCK_M=block_m, BLOCK_I=block_i, BLOCK_D=block_d,
        )
        ctx.save_for_backward(x, gate_up_proj, down_proj, flat_weights, order, tile_expert,
                              tile_start, tile_stop, offsets, gu)
        ctx.swiglu, ctx.K = swiglu, K
        ctx.weights_dtype, ctx.weights_shape = weights.dtype, weights.shape
        return y_slots.view(N, K, D).sum(1)

    @staticmethod
    def backward(ctx, dy):
        (x, gate_up_proj, down_proj, flat_weights, order, tile_expert, tile_start, tile_stop,
         offsets, gu) = ctx.saved_tensors
        swiglu, K = ctx.swiglu, ctx.K
        N, D = x.shape
        E, GU, _ = gate_up_proj.shape
        I = down_proj.shape[2]
        dy = dy.contiguous()
        block_m, block_i, block_d = _blocks(D, I)
        dot = _dot_dtype(x.dtype)
        n_tiles = tile_expert.shape[0]
        n_i_tiles = triton.cdiv(I, block_i)
        dgu = torch.zeros(N * K, GU, device=x.device, dtype=torch.float32)
        dweight_partial = torch.zeros(n_i_tiles, N * K, device=x.device, dtype=torch.float32)
        _dgu_kernel[(n_tiles, n_i_tiles)](
            dy, gu, down_proj, flat_weights, order, tile_expert, tile_start, tile_stop, dgu,
            dweight_partial, D, I, K, N * K,
            SWIGLU=swiglu, DOT=dot, BLOCK_M=block_m, BLOCK_I=block_i, BLOCK_D=block_d,
        )
        dx_slots = torch.zeros(N * K, D, device=x.device, dtype=torch.float32)
        block_j = _block(GU, 64 if not triton_interpreted() else 32)
        _dx_kernel[(n_tiles, triton.cdiv(D, block_d))](
            dgu, gate_up_proj, order, tile_expert, tile_start, tile_stop, dx_slots, D, GU, K,
            DOT=dot, BLOCK_M=block_m, BLOCK_J=block_j, BLOCK_D=block_d,
        )
        dgate_up = torch.empty_like(gate_up_proj)
        _dgate_up_weight_kernel[(E, triton.cdiv(GU, block_j), triton.cdiv(D, block_d))](
            dgu, x, order, offsets, dgate_up, D, GU, K,
            DOT=dot, BLOCK_M=block_m, BLOCK_J=block_j, BLOCK_D=block_d,
        )
        ddown = torch.empty_like(down_proj)
        _ddown_weight_kernel[(E, triton.cdiv(D, block_d), n_i_tiles)](
            dy, gu, flat_weights, order, offsets, ddown, D, I, K,
            SWIGLU=swiglu, DOT=dot, BLOCK_M=block_m, BLOCK_I=block_i, BLOCK_D=block_d,
        )
        dx = dx_slots.view(N, K, D).sum(1).to(x.dtype)
        dweights = dweight_partial.sum(0).view(ctx.weights_shape).to(ctx.weights_dtype)
        return dx, dgate_up, ddown, None, dweights, None


def moe_experts_triton(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    activation: str = "swiglu",
) -> torch.Tensor:
    """Same contract as `moe_experts_reference`; x: (N, D), expert_ids / weights: (N, K)."""
    return MoEExpertsFunction.apply(x, gate_up_proj, down_proj, expert_ids, weights,
                                    activation == "swiglu")
