"""Triton forward and backward of the direct causal long convolution, in one autograd Function.

The direct form is what decoding (T = 1 against a long history) and short chunks want: one pass
over the history, no FFT buffers. Costs O(T * (P + T) * D), so long T goes to the FFT path.
Layout (B, T, D), channels contiguous. A forward program owns a (BLOCK_T, BLOCK_D) tile of outputs
and one split of S_PER_PROGRAM inputs, walks them in BLOCK_S slices (forming the (t, s) lag tile
and gathering k at those lags), and writes a partial sum; the host adds the splits.
The history ("past", the P inputs before u) is read in place through its strides, so a decode
step does not copy a growing cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _load_inputs(u_ptr, past_ptr, i_b, s, mask, d, mask_d, T, P, D, stride_pb, stride_pt):
    """x[s] for the concatenation x = cat(past, u): s < P reads the history, s >= P reads u."""
    in_past = mask & (s < P)
    in_u = mask & (s >= P)
    xp = tl.load(past_ptr + i_b * stride_pb + s * stride_pt + d,
                 mask=in_past & mask_d, other=0.0).to(tl.float32)
    xu = tl.load(u_ptr + i_b * T * D + (s - P) * D + d,
                 mask=in_u & mask_d, other=0.0).to(tl.float32)
    return xp + xu


@triton.jit
def _direct_fwd_kernel(
    u_ptr, past_ptr, k_ptr, y_partial_ptr, B, T, P, D, S_PER_PROGRAM,
    stride_pb, stride_pt, stride_kd, stride_kl,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # program (split, b) sums inputs [split * S_PER_PROGRAM, (split + 1) * S_PER_PROGRAM): a
    # decode step (T = 1) against a long history would otherwise leave B * D / BLOCK_D programs
    # walking the whole history alone; the host adds the splits' partial sums
    i_sb, i_t, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_split, i_b = i_sb // B, i_sb % B
    t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_t, mask_d = t < T, d < D
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    # inputs after this tile's last output never reach it
    s_end = tl.minimum(P + tl.minimum(i_t * BLOCK_T + BLOCK_T, T), (i_split + 1) * S_PER_PROGRAM)
    for s0 in range(i_split * S_PER_PROGRAM, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask_s = s < s_end
        xv = _load_inputs(u_ptr, past_ptr, i_b, s[:, None], mask_s[:, None], d[None, :],
                          mask_d[None, :], T, P, D, stride_pb, stride_pt)  # (S, D)
        lag = (P + t)[:, None] - s[None, :]  # (T, S); negative = the future, masked out
        valid = (lag >= 0) & mask_t[:, None] & mask_s[None, :]
        kv = tl.load(k_ptr + d[None, None, :] * stride_kd + lag[:, :, None] * stride_kl,
                     mask=valid[:, :, None] & mask_d[None, None, :], other=0.0).to(tl.float32)
        acc += tl.sum(kv * xv[None, :, :], axis=1)
    tl.store(y_partial_ptr + ((i_split * B + i_b) * T + t[:, None]) * D + d[None, :], acc,
             mask=mask_t[:, None] & mask_d[None, :])


@triton.jit
def _direct_bwd_input_kernel(
    dy_ptr, k_ptr, dx_ptr, T, P, D, stride_kd, stride_kl,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # dx[s] = sum_{t : P + t >= s} k[P + t - s] * dy[t], over all S = P + T inputs
    i_b, i_s, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    S = P + T
    s = i_s * BLOCK_S + tl.arange(0, BLOCK_S)
    d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_s, mask_d = s < S, d < D
    acc = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
    # outputs before this tile's first input are not reached by it
    t_start = tl.maximum(i_s * BLOCK_S - P, 0)
    for t0 in range(t_start, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask_t = t < T
        g = tl.load(dy_ptr + i_b * T * D + t[:, None] * D + d[None, :],
                    mask=mask_t[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        lag = (P + t)[None, :] - s[:, None]  # (S, T)
        valid = (lag >= 0) & mask_t[None, :] & mask_s[:, None]
        kv = tl.load(k_ptr + d[None, None, :] * stride_kd + lag[:, :, None] * stride_kl,
                     mask=valid[:, :, None] & mask_d[None, None, :], other=0.0).to(tl.float32)
        acc += tl.sum(kv * g[None, :, :], axis=1)
    tl.store(dx_ptr + i_b * S * D + s[:, None] * D + d[None, :], acc,
             mask=mask_s[:, None] & mask_d[None, :])


@triton.jit
def _direct_bwd_filter_kernel(
    dy_ptr, u_ptr, past_ptr, dk_partial_ptr, T, P, D, stride_pb, stride_pt,
    BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one batch row's share of dk[j] = sum_t dy[t] * x[P + t - j]; the host sums over rows
    i_b, i_j, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    S = P + T
    j = i_j * BLOCK_J + tl.arange(0, BLOCK_J)
    d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_j, mask_d = j < S, d < D
    acc = tl.zeros((BLOCK_J, BLOCK_D), dtype=tl.float32)
    t_start = tl.maximum(i_j * BLOCK_J - P, 0)  # x[P + t - j] exists only for t >= j - P
    for t0 in range(t_start, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask_t = t < T
        g = tl.load(dy_ptr + i_b * T * D + t[:, None] * D + d[None, :],
                    mask=mask_t[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        s = (P + t)[None, :] - j[:, None]  # (J, T) input index of lag j for output t
        valid = (s >= 0) & mask_t[None, :] & mask_j[:, None]
        xv = _load_inputs(u_ptr, past_ptr, i_b, s[:, :, None], valid[:, :, None],
                          d[None, None, :], mask_d[None, None, :], T, P, D, stride_pb, stride_pt)
        acc += tl.sum(xv * g[None, :, :], axis=1)
    tl.store(dk_partial_ptr + i_b * S * D + j[:, None] * D + d[None, :], acc,
             mask=mask_j[:, None] & mask_d[None, :])


# inputs per forward program: BLOCK_S-slices walked by one program before the splits are summed
S_PER_PROGRAM = 512


def _blocks(T: int, D: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_S, BLOCK_D): 3-D (T, S, D) tiles of at most 16 * 16 * 32 values."""
    return min(16, triton.next_power_of_2(max(T, 1))), 16, min(32, triton.next_power_of_2(D))


class DirectConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, k, bias, initial_state):
        B, T, D = u.shape
        u = u.contiguous()
        has_state = initial_state is not None and initial_state.shape[1] > 0
        if has_state:
            # read in place through its strides (a view of a preallocated cache); only the
            # channel dim must be contiguous
            past = initial_state.to(u.dtype)
            past = past if past.stride(-1) == 1 else past.contiguous()
            P, stride_pb, stride_pt = past.shape[1], past.stride(0), past.stride(1)
        else:
            past, P, stride_pb, stride_pt = u, 0, 0, 0  # never read: every s >= P = 0
        block_t, block_s, block_d = _blocks(T, D)
        S = P + T
        per_program = max(S_PER_PROGRAM, block_s)
        n_splits = triton.cdiv(S, per_program)
        y_partial = torch.empty(n_splits, B, T, D, device=u.device, dtype=torch.float32)
        grid = (n_splits * B, triton.cdiv(T, block_t), triton.cdiv(D, block_d))
        _direct_fwd_kernel[grid](
            u, past, k, y_partial, B, T, P, D, per_program,
            stride_pb, stride_pt, k.stride(0), k.stride(1),
            BLOCK_T=block_t, BLOCK_S=block_s, BLOCK_D=block_d,
        )
        y = y_partial.sum(0) if n_splits > 1 else y_partial[0]
        if bias is not None:
            y = y + bias.float() * u.float()
        y = y.to(u.dtype)
        ctx.save_for_backward(u, past, k, bias)
        ctx.P, ctx.has_state = P, has_state
        ctx.strides = (stride_pb, stride_pt)
        ctx.initial_state_given = initial_state is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        u, past, k, bias = ctx.saved_tensors
        B, T, D = u.shape
        P, S = ctx.P, ctx.P + T
        stride_pb, stride_pt = ctx.strides
        dy = dy.contiguous()
        block_t, block_s, block_d = _blocks(T, D)
        du = dk = dbias = dpast = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[3]:
            dx = torch.empty(B, S, D, device=u.device, dtype=torch.float32)
            grid = (B, triton.cdiv(S, block_s), triton.cdiv(D, block_d))
            _direct_bwd_input_kernel[grid](
                dy, k, dx, T, P, D, k.stride(0), k.stride(1),
                BLOCK_T=block_t, BLOCK_S=block_s, BLOCK_D=block_d,
            )
            du = dx[:, P:]
            if bias is not None:
                du = du + bias.float() * dy.float()
            du = du.to(u.dtype)
            if ctx.initial_state_given:
                dpast = dx[:, :P].to(u.dtype)
        if ctx.needs_input_grad[1]:
            dk_partial = torch.empty(B, S, D, device=u.device, dtype=torch.float32)
            grid = (B, triton.cdiv(S, block_s), triton.cdiv(D, block_d))
            _direct_bwd_filter_kernel[grid](
                dy, u, past, dk_partial, T, P, D, stride_pb, stride_pt,
                BLOCK_T=block_t, BLOCK_J=block_s, BLOCK_D=block_d,
            )
            dk = torch.zeros_like(k)  # lags >= S reach no output
            dk[:, :S] = dk_partial.sum(0).t().to(k.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            dbias = (dy.float() * u.float()).sum((0, 1)).to(bias.dtype)
        return du, dk, dbias, dpast


def fft_conv_triton(
    u: torch.Tensor,
    k: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `fft_conv_reference`, computed directly; u: (B, T, D), k: (D, L)."""
    return DirectConvFunction.apply(u, k, bias, initial_state)
