"""Fused RMSNorm: one program per block of rows, forward and backward, statistics in float32."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr, M, N, eps,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_N)
    mask_n = cols < N
    w = tl.load(w_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)
    for r in tl.static_range(ROWS):
        row = tl.program_id(0) * ROWS + r
        if row < M:
            x = tl.load(x_ptr + row * N + cols, mask=mask_n, other=0.0).to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
            tl.store(rstd_ptr + row, rstd)
            # rounding x_hat to the input dtype before the scale matches the reference exactly
            x_hat = (x * rstd).to(y_ptr.dtype.element_ty).to(tl.float32)
            tl.store(y_ptr + row * N + cols, (x_hat * w).to(y_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _rms_norm_bwd_kernel(
    x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, M, N,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_N)
    mask_n = cols < N
    w = tl.load(w_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r in tl.static_range(ROWS):
        row = tl.program_id(0) * ROWS + r
        if row < M:
            x = tl.load(x_ptr + row * N + cols, mask=mask_n, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * N + cols, mask=mask_n, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            x_hat = x * rstd
            dw += dy * x_hat
            g = dy * w
            # d/dx of x * rstd(x): rstd * (g - x_hat * mean(g * x_hat))
            dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=0) / N))
            tl.store(dx_ptr + row * N + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask_n)
    tl.store(dw_partial_ptr + tl.program_id(0) * N + cols, dw, mask=mask_n)


ROWS_PER_PROGRAM = 8


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        M, N = x2.shape
        y = torch.empty_like(x2)
        rstd = torch.empty(M, device=x.device, dtype=torch.float32)
        block_n = triton.next_power_of_2(N)
        grid = (triton.cdiv(M, ROWS_PER_PROGRAM),)
        _rms_norm_fwd_kernel[grid](x2, weight.contiguous(), y, rstd, M, N, eps,
                                   ROWS=ROWS_PER_PROGRAM, BLOCK_N=block_n)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        M, N = x2.shape
        dy2 = dy.reshape(M, N).contiguous()
        dx = torch.empty_like(x2)
        grid = (triton.cdiv(M, ROWS_PER_PROGRAM),)
        dw_partial = torch.empty(grid[0], N, device=x2.device, dtype=torch.float32)
        _rms_norm_bwd_kernel[grid](x2, weight.contiguous(), dy2, rstd, dx, dw_partial, M, N,
                                   ROWS=ROWS_PER_PROGRAM, BLOCK_N=triton.next_power_of_2(N))
        return dx.reshape(ctx.shape), dw_partial.sum(0).to(weight.dtype), None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x: (..., N); weight: (N,)."""
    return RMSNormFunction.apply(x, weight, eps)
