"""Triton forward and backward of the depthwise causal convolution, in one autograd Function.

Layout (B, T, D), channels contiguous: a program owns a (BLOCK_T, BLOCK_D) tile and loops over
the W taps, reading the taps that fall before t = 0 from the carried state.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _conv_fwd_kernel(
    x_ptr, state_ptr, w_ptr, b_ptr, y_ptr, T, D,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_b, i_t, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_t, mask_d = t < T, d < D
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(W):
        s = t + k - (W - 1)  # input time of tap k; s < 0 lives in the carried state
        in_x = (s >= 0) & mask_t
        in_state = (s < 0) & mask_t
        xv = tl.load(x_ptr + i_b * T * D + s[:, None] * D + d[None, :],
                     mask=in_x[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        sv = tl.load(state_ptr + i_b * (W - 1) * D + (s + W - 1)[:, None] * D + d[None, :],
                     mask=in_state[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        wk = tl.load(w_ptr + d * W + k, mask=mask_d, other=0.0).to(tl.float32)
        acc += (xv + sv) * wk[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y_ptr + i_b * T * D + t[:, None] * D + d[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask_t[:, None] & mask_d[None, :])


@triton.jit
def _conv_bwd_input_kernel(
    dpre_ptr, w_ptr, dpadded_ptr, T, D,
    W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # d padded[j] = sum_k w[k] * dpre[j - k], over padded positions j in [0, T + W - 1)
    i_b, i_j, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    j = i_j * BLOCK_T + tl.arange(0, BLOCK_T)
    d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = d < D
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(W):
        t = j - k
        valid = (t >= 0) & (t < T)
        g = tl.load(dpre_ptr + i_b * T * D + t[:, None] * D + d[None, :],
                    mask=valid[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        wk = tl.load(w_ptr + d * W + k, mask=mask_d, other=0.0).to(tl.float32)
        acc += g * wk[None, :]
    L = T + W - 1
    tl.store(dpadded_ptr + i_b * L * D + j[:, None] * D + d[None, :], acc,
             mask=(j < L)[:, None] & mask_d[None, :])


@triton.jit
def _conv_bwd_weight_kernel(
    dpre_ptr, x_ptr, state_ptr, dw_partial_ptr, T, D, N_T_BLOCKS,
    W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # partial dw[k] over one time tile: sum_t dpre[t] * input[t - (W - 1) + k]
    i_b, i_t, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_t, mask_d = t < T, d < D
    g = tl.load(dpre_ptr + i_b * T * D + t[:, None] * D + d[None, :],
                mask=mask_t[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    out = dw_partial_ptr + ((i_b * N_T_BLOCKS + i_t) * W) * D
    for k in tl.static_range(W):
        s = t + k - (W - 1)
        in_x = (s >= 0) & mask_t
        in_state = (s < 0) & mask_t
        xv = tl.load(x_ptr + i_b * T * D + s[:, None] * D + d[None, :],
                     mask=in_x[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        sv = tl.load(state_ptr + i_b * (W - 1) * D + (s + W - 1)[:, None] * D + d[None, :],
                     mask=in_state[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        tl.store(out + k * D + d, tl.sum(g * (xv + sv), axis=0), mask=mask_d)


def _blocks(T: int, D: int) -> tuple[int, int]:
    return min(64, triton.next_power_of_2(max(T, 1))), min(64, triton.next_power_of_2(D))


def _forward(x, state, weight, bias, silu: bool) -> torch.Tensor:
    B, T, D = x.shape
    W = weight.shape[1]
    y = torch.empty_like(x)
    block_t, block_d = _blocks(T, D)
    grid = (B, triton.cdiv(T, block_t), triton.cdiv(D, block_d))
    _conv_fwd_kernel[grid](
        x, state, weight, bias if bias is not None else weight, y, T, D,
        W=W, HAS_BIAS=bias is not None, SILU=silu, BLOCK_T=block_t, BLOCK_D=block_d,
    )
    return y


class CausalConv1dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, silu: bool):
        B, T, D = x.shape
        W = weight.shape[1]
        x, weight = x.contiguous(), weight.contiguous()
        state = (initial_state if initial_state is not None else x.new_zeros(B, W - 1, D))
        state = state.to(x.dtype).contiguous()
        y = _forward(x, state, weight, bias, silu)
        final_state = torch.cat([state, x], dim=1)[:, T:].clone()
        ctx.save_for_backward(x, state, weight, bias)
        ctx.silu = silu
        ctx.has_initial_state = initial_state is not None
        return y, final_state

    @staticmethod
    def backward(ctx, dy, dfinal_state):
        x, state, weight, bias = ctx.saved_tensors
        B, T, D = x.shape
        W = weight.shape[1]
        dy = dy.contiguous()
        if ctx.silu:
            pre = _forward(x, state, weight, bias, silu=False).float()
            sig = torch.sigmoid(pre)
            dpre = (dy.float() * sig * (1 + pre * (1 - sig))).contiguous()
        else:
            dpre = dy.float()
        block_t, block_d = _blocks(T + W - 1, D)
        L = T + W - 1
        dpadded = torch.empty(B, L, D, device=x.device, dtype=torch.float32)
        grid = (B, triton.cdiv(L, block_t), triton.cdiv(D, block_d))
        _conv_bwd_input_kernel[grid](dpre, weight, dpadded, T, D, W=W, BLOCK_T=block_t,
                                     BLOCK_D=block_d)
        if dfinal_state is not None:
            dpadded[:, T:] += dfinal_state.float()
        block_t, block_d = _blocks(T, D)
        n_t = triton.cdiv(T, block_t)
        dw_partial = torch.empty(B, n_t, W, D, device=x.device, dtype=torch.float32)
        _conv_bwd_weight_kernel[(B, n_t, triton.cdiv(D, block_d))](
            dpre, x, state, dw_partial, T, D, n_t, W=W, BLOCK_T=block_t, BLOCK_D=block_d,
        )
        dweight = dw_partial.sum((0, 1)).t().to(weight.dtype)
        dbias = dpre.sum((0, 1)).to(bias.dtype) if bias is not None else None
        dx = dpadded[:, W - 1 :].to(x.dtype)
        dstate = dpadded[:, : W - 1].to(x.dtype) if ctx.has_initial_state else None
        return dx, dweight, dbias, dstate, None


def causal_conv1d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as `causal_conv1d_reference`; x: (B, T, D), weight: (D, W)."""
    y, final_state = CausalConv1dFunction.apply(x, weight, bias, initial_state,
                                                activation is not None)
    return y, (final_state if output_final_state else None)


