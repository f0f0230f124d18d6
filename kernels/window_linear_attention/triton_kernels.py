"""Triton kernels for the window part of `window_linear_attention`, forward and backward, in one
autograd Function; the linear part is zoo's `linear_attention` op on its Triton backend.

The window part works on the context of W + T tokens (state.py): query t sits at context index
x_t = W + t and sees the keys at (x_t - W, x_t] that are filled (>= start). With m_t the maximum
score over them, held constant,

    p_ts = exp(scale q_t . k_s - m_t),   A_t = sum_s p_ts v_s,   a_t = sum_s p_ts.

Forward (_window_fwd_kernel): one program per block of queries walks the key blocks its band
reaches with an online maximum (as FlashAttention's forward), so A and a end relative to the
true m_t, which it stores for the backward. Backward, with m constant there is no softmax
Jacobian: dp_ts = dA_t . v_s + da_t, ds_ts = p_ts dp_ts, dq_t = scale sum_s ds_ts k_s
(_window_dq_kernel, per query block), dk_s = scale sum_t ds_ts q_t and dv_s = sum_t p_ts dA_t
(_window_dkdv_kernel, per key block, over the queries whose band holds it).

Tiles hold all D (and Dv) channels, padded to a power of two >= 16; D, Dv <= 256.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreted
from ..precision import compute_dtype
from .state import WindowLinearAttentionState
from .torch_chunked import compose

MAX_DIM = 256


@triton.jit
def _load_rows(ptr, b, h, t, T, H, D, cols):
    """(len(t), len(cols)) tile of a (B, T, H, D) tensor, zero outside t < T and cols < D."""
    mask = (t < T)[:, None] & (cols < D)[None, :]
    return tl.load(ptr + ((b * T + t[:, None]) * H + h) * D + cols[None, :], mask=mask,
                   other=0.0).to(tl.float32)


@triton.jit
def _load_per_token(ptr, b, h, t, T, H):
    """(len(t),) values of a (B, T, H) tensor, zero outside t < T."""
    return tl.load(ptr + (b * T + t) * H + h, mask=t < T, other=0.0).to(tl.float32)


@triton.jit
def _in_band(t, s, T, TX, W, start):
    """(len(t), len(s)): key s (context index) is in query t's window and filled."""
    x_t = t + W
    return ((s[None, :] <= x_t[:, None]) & (s[None, :] > x_t[:, None] - W)
            & ((s >= start) & (s < TX))[None, :] & (t < T)[:, None])


@triton.jit
def _window_fwd_kernel(
    q_ptr, k_ptr, v_ptr, A_ptr, a_ptr, m_ptr, scale, T, TX, H, D, DV, W, start,
    BT: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    b, h = i_bh // H, i_bh % H
    t = i_t * BT + tl.arange(0, BT)
    dd, vv = tl.arange(0, BD), tl.arange(0, BV)
    q_c = _load_rows(q_ptr, b, h, t, T, H, D, dd) * scale
    m_i = tl.full((BT,), float("-inf"), dtype=tl.float32)
    a_i = tl.zeros((BT,), dtype=tl.float32)
    acc = tl.zeros((BT, BV), dtype=tl.float32)
    # the block's windows span context indices i_t BT + 1 .. i_t BT + BT - 1 + W
    lo = tl.maximum(i_t * BT + 1, start)
    hi = tl.minimum(i_t * BT + BT + W, TX)
    for s0 in range(lo, hi, BS):
        s = s0 + tl.arange(0, BS)
        k_c = _load_rows(k_ptr, b, h, s, TX, H, D, dd)
        v_c = _load_rows(v_ptr, b, h, s, TX, H, DV, vv)
        scores = tl.dot(q_c, tl.trans(k_c), input_precision=PRECISION)
        scores = tl.where(_in_band(t, s, T, TX, W, start), scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        # a row with nothing allowed yet keeps -inf; 0 stands in so no -inf - -inf = NaN forms
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(scores - m_safe[:, None])
        a_i = a_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v_c, input_precision=PRECISION)
        m_i = m_new
    rows = (b * T + t) * H + h
    tl.store(A_ptr + rows[:, None] * DV + vv[None, :], acc,
             mask=(t < T)[:, None] & (vv < DV)[None, :])
    tl.store(a_ptr + rows, a_i, mask=t < T)
    tl.store(m_ptr + rows, m_i, mask=t < T)


@triton.jit
def _window_dq_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, dA_ptr, da_ptr, dq_ptr, scale, T, TX, H, D, DV, W, start,
    BT: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    b, h = i_bh // H, i_bh % H
    t = i_t * BT + tl.arange(0, BT)
    dd, vv = tl.arange(0, BD), tl.arange(0, BV)
    q_c = _load_rows(q_ptr, b, h, t, T, H, D, dd) * scale
    dA_c = _load_rows(dA_ptr, b, h, t, T, H, DV, vv)
    da_c = _load_per_token(da_ptr, b, h, t, T, H)
    m_c = _load_per_token(m_ptr, b, h, t, T, H)
    dq = tl.zeros((BT, BD), dtype=tl.float32)
    lo = tl.maximum(i_t * BT + 1, start)
    hi = tl.minimum(i_t * BT + BT + W, TX)
    for s0 in range(lo, hi, BS):
        s = s0 + tl.arange(0, BS)
        k_c = _load_rows(k_ptr, b, h, s, TX, H, D, dd)
        v_c = _load_rows(v_ptr, b, h, s, TX, H, DV, vv)
        scores = tl.dot(q_c, tl.trans(k_c), input_precision=PRECISION)
        p = tl.where(_in_band(t, s, T, TX, W, start), tl.exp(scores - m_c[:, None]), 0.0)
        dp = tl.dot(dA_c, tl.trans(v_c), input_precision=PRECISION) + da_c[:, None]
        dq += tl.dot(p * dp, k_c, input_precision=PRECISION)
    tl.store(dq_ptr + ((b * T + t[:, None]) * H + h) * D + dd[None, :], dq * scale,
             mask=(t < T)[:, None] & (dd < D)[None, :])


@triton.jit
def _window_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, dA_ptr, da_ptr, dk_ptr, dv_ptr, scale, T, TX, H, D, DV, W,
    start,
    BT: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_s, i_bh = tl.program_id(0), tl.program_id(1)
    b, h = i_bh // H, i_bh % H
    s = i_s * BS + tl.arange(0, BS)
    dd, vv = tl.arange(0, BD), tl.arange(0, BV)
    k_c = _load_rows(k_ptr, b, h, s, TX, H, D, dd)
    v_c = _load_rows(v_ptr, b, h, s, TX, H, DV, vv)
    dk = tl.zeros((BS, BD), dtype=tl.float32)
    dv = tl.zeros((BS, BV), dtype=tl.float32)
    # key s is in the windows of the queries t = s - W .. s - 1
    lo = tl.maximum(i_s * BS - W, 0)
    hi = tl.minimum(i_s * BS + BS - 1, T)
    for t0 in range(lo, hi, BT):
        t = t0 + tl.arange(0, BT)
        q_c = _load_rows(q_ptr, b, h, t, T, H, D, dd) * scale
        dA_c = _load_rows(dA_ptr, b, h, t, T, H, DV, vv)
        da_c = _load_per_token(da_ptr, b, h, t, T, H)
        m_c = _load_per_token(m_ptr, b, h, t, T, H)
        scores = tl.dot(q_c, tl.trans(k_c), input_precision=PRECISION)
        p = tl.where(_in_band(t, s, T, TX, W, start), tl.exp(scores - m_c[:, None]), 0.0)
        dv += tl.dot(tl.trans(p), dA_c, input_precision=PRECISION)
        dp = tl.dot(dA_c, tl.trans(v_c), input_precision=PRECISION) + da_c[:, None]
        dk += tl.dot(tl.trans(p * dp), q_c, input_precision=PRECISION)  # q_c carries the scale
    rows = (b * TX + s[:, None]) * H + h
    in_range = (s < TX)[:, None]
    tl.store(dk_ptr + rows * D + dd[None, :], dk, mask=in_range & (dd < D)[None, :])
    tl.store(dv_ptr + rows * DV + vv[None, :], dv, mask=in_range & (vv < DV)[None, :])


class _Plan:
    """Sizes and launch constants shared by the forward and backward launches."""

    def __init__(self, q: torch.Tensor, vx: torch.Tensor, window: int, start: int,
                 precision: str):
        self.B, self.T, self.H, self.D = q.shape
        self.TX, self.DV = vx.shape[1], vx.shape[-1]
        self.W, self.start = window, start
        self.BD = max(16, triton.next_power_of_2(self.D))
        self.BV = max(16, triton.next_power_of_2(self.DV))
        # the interpreter runs every tile op in NumPy: small tiles keep tests fast
        block = 16 if triton_interpreted() else (64 if max(self.BD, self.BV) <= 64 else 32)
        self.BT = self.BS = block
        self.precision = precision

    def sizes(self) -> tuple:
        return self.T, self.TX, self.H, self.D, self.DV, self.W, self.start

    def constants(self) -> dict:
        return dict(BT=self.BT, BS=self.BS, BD=self.BD, BV=self.BV, PRECISION=self.precision)


class WindowAttentionFunction(torch.autograd.Function):
    """(q, kx, vx) -> (A, a) of the window part in float32, m held constant (see the top)."""

    @staticmethod
    def forward(ctx, q, kx, vx, scale: float, window: int, start: int, precision: str):
        q, kx, vx = q.contiguous(), kx.contiguous(), vx.contiguous()
        plan = _Plan(q, vx, window, start, precision)
        B, T, H = plan.B, plan.T, plan.H
        fp32 = dict(device=q.device, dtype=torch.float32)
        A = torch.empty(B, T, H, plan.DV, **fp32)
        a, m = torch.empty(B, T, H, **fp32), torch.empty(B, T, H, **fp32)
        _window_fwd_kernel[(triton.cdiv(T, plan.BT), B * H)](
            q, kx, vx, A, a, m, scale, *plan.sizes(), **plan.constants())
        ctx.save_for_backward(q, kx, vx, m)
        ctx.plan, ctx.scale = plan, scale
        return A, a

    @staticmethod
    def backward(ctx, dA, da):
        q, kx, vx, m = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        B, H = plan.B, plan.H
        dA, da = dA.float().contiguous(), da.float().contiguous()
        dq = torch.empty(q.shape, device=q.device, dtype=torch.float32)
        dk = torch.empty(kx.shape, device=q.device, dtype=torch.float32)
        dv = torch.empty(vx.shape, device=q.device, dtype=torch.float32)
        _window_dq_kernel[(triton.cdiv(plan.T, plan.BT), B * H)](
            q, kx, vx, m, dA, da, dq, scale, *plan.sizes(), **plan.constants())
        _window_dkdv_kernel[(triton.cdiv(plan.TX, plan.BS), B * H)](
            q, kx, vx, m, dA, da, dk, dv, scale, *plan.sizes(), **plan.constants())
        return dq.to(q.dtype), dk.to(kx.dtype), dv.to(vx.dtype), None, None, None, None


def window_linear_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    window: int,
    linear_scale: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: WindowLinearAttentionState | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, WindowLinearAttentionState | None]:
    """Same contract as `window_linear_attention_chunked`; computes in float32 (also for
    float64 inputs, whose S and z come back as float64)."""
    op = "window_linear_attention"
    D, Dv = q.shape[-1], v.shape[-1]
    if max(D, Dv) > MAX_DIM:
        raise ValueError(f"{op}: backend='triton' supports D, Dv <= {MAX_DIM} channels per "
                         f"head, got D = {D}, Dv = {Dv}; use backend='torch'")
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"{op}: backend='triton' needs chunk_size a power of two >= 16, "
                         f"got {chunk_size}")
    scale = D ** -0.5 if scale is None else scale
    # float32 inputs get exact float32 products; lower precision inputs may use TF32
    precision = "ieee" if compute_dtype(q.dtype) == q.dtype else "tf32"

    def window_part(q, kx, vx, scale, window, start, block):
        return WindowAttentionFunction.apply(q, kx, vx, scale, window, start, precision)

    return compose(q, k, v, phi_q, phi_k, window, linear_scale, scale, initial_state,
                   output_final_state, chunk_size, window_part=window_part, backend="triton",
                   dtype=torch.float32)
