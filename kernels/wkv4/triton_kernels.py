"""Triton forward and backward of RWKV-4's WKV, in one autograd Function.

The recurrence is per channel, so a program owns one batch row and BLOCK_C channels and walks
time sequentially (the design of RWKV-LM's CUDA kernel); channels are contiguous in the (B, T, C)
layout, so each step's loads coalesce. Everything runs in float32 with the (num, den, max)
stabilisation of the reference.

Backward recomputes the forward in two passes; `decay` below is -e^w, A_t / B_t the real
numerator / denominator before token t (A_t = num_t e^{max_t}), D_t the output denominator.

- forward in time: the direct gradients of y_t = (A_t + e^{u+k_t} v_t) / D_t with respect to
  u, k_t, v_t, and d/d decay by forward-mode tangents TA_t = dA_t/d decay (TA_{t+1} =
  e^decay (A_t + TA_t)), kept with the state's scale e^{max_t} so they never overflow. It also
  stores gy_t / D_t (as gy_t / d_t and the exponent p_t, D_t = d_t e^{p_t}) for the second pass.
- backward in time: the adjoints gA_t = dL/dA_t = gy_t / D_t + e^decay gA_{t+1}, kept as
  ga e^{gm} with their own running maximum gm; token i's key and value reach the state as
  e^{k_i} v_i, so they get e^{k_i + gm} (ga v_i + gb), where k_i + gm <= 0 always.
The final state's max = max(max_0 + T decay, max_i k_i + (T-1-i) decay) is an output too: its
gradient goes to the winning term (a key, or the initial max), as the reference's maximum does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import empty_wkv4_state


@triton.jit
def _wkv4_fwd_kernel(
    decay_ptr, u_ptr, k_ptr, v_ptr, state_ptr, y_ptr, final_ptr, T, C,
    BLOCK_C: tl.constexpr,
):
    i_b, i_c = tl.program_id(0), tl.program_id(1)
    c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = c < C
    decay = tl.load(decay_ptr + c, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + c, mask=mask, other=0.0).to(tl.float32)
    s = state_ptr + i_b * 3 * C + c
    num = tl.load(s, mask=mask, other=0.0).to(tl.float32)
    den = tl.load(s + C, mask=mask, other=0.0).to(tl.float32)
    mx = tl.load(s + 2 * C, mask=mask, other=0.0).to(tl.float32)
    base = i_b * T * C + c
    for t in range(T):
        kt = tl.load(k_ptr + base + t * C, mask=mask, other=0.0).to(tl.float32)
        vt = tl.load(v_ptr + base + t * C, mask=mask, other=0.0).to(tl.float32)
        p = tl.maximum(mx, u + kt)
        e1 = tl.exp(mx - p)
        e2 = tl.exp(u + kt - p)
        y = (e1 * num + e2 * vt) / (e1 * den + e2)
        tl.store(y_ptr + base + t * C, y.to(y_ptr.dtype.element_ty), mask=mask)
        p = tl.maximum(mx + decay, kt)
        e1 = tl.exp(mx + decay - p)
        e2 = tl.exp(kt - p)
        num = e1 * num + e2 * vt
        den = e1 * den + e2
        mx = p
    f = final_ptr + i_b * 3 * C + c
    tl.store(f, num, mask=mask)
    tl.store(f + C, den, mask=mask)
    tl.store(f + 2 * C, mx, mask=mask)


@triton.jit
def _wkv4_bwd_forward_pass_kernel(
    decay_ptr, u_ptr, k_ptr, v_ptr, state_ptr, gy_ptr, gfinal_ptr,
    dk_ptr, dv_ptr, ca_ptr, cb_ptr, p_ptr, ddecay_ptr, du_ptr, gmax_ptr, win_ptr, final_ptr,
    T, C, BLOCK_C: tl.constexpr,
):
    i_b, i_c = tl.program_id(0), tl.program_id(1)
    c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = c < C
    decay = tl.load(decay_ptr + c, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + c, mask=mask, other=0.0).to(tl.float32)
    s = state_ptr + i_b * 3 * C + c
    num = tl.load(s, mask=mask, other=0.0).to(tl.float32)
    den = tl.load(s + C, mask=mask, other=0.0).to(tl.float32)
    mx = tl.load(s + 2 * C, mask=mask, other=0.0).to(tl.float32)
    t_num = tl.zeros((BLOCK_C,), dtype=tl.float32)  # dA/d decay, scaled by e^-max like num
    t_den = tl.zeros((BLOCK_C,), dtype=tl.float32)
    g_decay = tl.zeros((BLOCK_C,), dtype=tl.float32)
    g_u = tl.zeros((BLOCK_C,), dtype=tl.float32)
    winner = tl.full((BLOCK_C,), -1, dtype=tl.int32)  # which term holds the final max; -1: state
    base = i_b * T * C + c
    for t in range(T):
        kt = tl.load(k_ptr + base + t * C, mask=mask, other=0.0).to(tl.float32)
        vt = tl.load(v_ptr + base + t * C, mask=mask, other=0.0).to(tl.float32)
        gyt = tl.load(gy_ptr + base + t * C, mask=mask, other=0.0).to(tl.float32)
        p = tl.maximum(mx, u + kt)
        e1 = tl.exp(mx - p)
        e2 = tl.exp(u + kt - p)
        d = e1 * den + e2
        y = (e1 * num + e2 * vt) / d
        cy = gyt / d  # gy_t / D_t = cy e^{-p}
        g_decay += cy * e1 * (t_num - y * t_den)
        gk = cy * e2 * (vt - y)
        g_u += gk
        tl.store(dk_ptr + base + t * C, gk, mask=mask)
        tl.store(dv_ptr + base + t * C, cy * e2, mask=mask)
        tl.store(ca_ptr + base + t * C, cy, mask=mask)
        tl.store(cb_ptr + base + t * C, -cy * y, mask=mask)
        tl.store(p_ptr + base + t * C, p, mask=mask)
        ww = mx + decay
        p = tl.maximum(ww, kt)
        e1 = tl.exp(ww - p)
        e2 = tl.exp(kt - p)
        t_num = e1 * (num + t_num)
        t_den = e1 * (den + t_den)
        num = e1 * num + e2 * vt
        den = e1 * den + e2
        winner = tl.where(kt > ww, t, winner)
        mx = p
    g = gfinal_ptr + i_b * 3 * C + c
    g_num = tl.load(g, mask=mask, other=0.0).to(tl.float32)
    g_den = tl.load(g + C, mask=mask, other=0.0).to(tl.float32)
    g_max = tl.load(g + 2 * C, mask=mask, other=0.0).to(tl.float32)
    # the final num = A_T e^{-max_T}: through A_T (tangents) and through max_T
    g_decay += g_num * t_num + g_den * t_den
    g_max = g_max - g_num * num - g_den * den
    steps = tl.where(winner < 0, T, T - 1 - winner).to(tl.float32)
    g_decay += g_max * steps
    out = i_b * C + c
    tl.store(ddecay_ptr + out, g_decay, mask=mask)
    tl.store(du_ptr + out, g_u, mask=mask)
    tl.store(gmax_ptr + out, g_max, mask=mask)
    tl.store(win_ptr + out, winner, mask=mask)
    f = final_ptr + i_b * 3 * C + c
    tl.store(f, num, mask=mask)
    tl.store(f + C, den, mask=mask)
    tl.store(f + 2 * C, mx, mask=mask)


@triton.jit
def _wkv4_bwd_backward_pass_kernel(
    decay_ptr, k_ptr, v_ptr, state_ptr, gfinal_ptr, final_ptr, ca_ptr, cb_ptr, p_ptr,
    gmax_ptr, win_ptr, dk_ptr, dv_ptr, dstate_ptr, T, C, BLOCK_C: tl.constexpr,
):
    i_b, i_c = tl.program_id(0), tl.program_id(1)
    c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = c < C
    decay = tl.load(decay_ptr + c, mask=mask, other=0.0).to(tl.float32)
    g = gfinal_ptr + i_b * 3 * C + c
    ga = tl.load(g, mask=mask, other=0.0).to(tl.float32)  # gA_T = g_num e^{-max_T}
    gb = tl.load(g + C, mask=mask, other=0.0).to(tl.float32)
    gm = -tl.load(final_ptr + i_b * 3 * C + 2 * C + c, mask=mask, other=0.0).to(tl.float32)
    out = i_b * C + c
    g_max = tl.load(gmax_ptr + out, mask=mask, other=0.0)
    winner = tl.load(win_ptr + out, mask=mask, other=-1)
    base = i_b * T * C + c
    for r in range(T):
        t = T - 1 - r
        kt = tl.load(k_ptr + base + t * C, mask=mask, other=0.0).to(tl.float32)
        vt = tl.load(v_ptr + base + t * C, mask=mask, other=0.0).to(tl.float32)
        scale = tl.exp(gm + kt)  # e^{k_t} gA_{t+1} = e^{k_t + gm} ga, and k_t + gm <= 0
        gk = tl.load(dk_ptr + base + t * C, mask=mask, other=0.0)
        gk += scale * (ga * vt + gb) + tl.where(winner == t, g_max, 0.0)
        gv = tl.load(dv_ptr + base + t * C, mask=mask, other=0.0) + scale * ga
        tl.store(dk_ptr + base + t * C, gk, mask=mask)
        tl.store(dv_ptr + base + t * C, gv, mask=mask)
        # gA_t = e^decay gA_{t+1} + (gy_t / d_t) e^{-p_t}
        ca = tl.load(ca_ptr + base + t * C, mask=mask, other=0.0)
        cb = tl.load(cb_ptr + base + t * C, mask=mask, other=0.0)
        neg_p = -tl.load(p_ptr + base + t * C, mask=mask, other=0.0)
        n = tl.maximum(gm + decay, neg_p)
        e1 = tl.exp(gm + decay - n)
        e2 = tl.exp(neg_p - n)
        ga = e1 * ga + e2 * ca
        gb = e1 * gb + e2 * cb
        gm = n
    s = state_ptr + i_b * 3 * C + c
    num0 = tl.load(s, mask=mask, other=0.0).to(tl.float32)
    den0 = tl.load(s + C, mask=mask, other=0.0).to(tl.float32)
    mx0 = tl.load(s + 2 * C, mask=mask, other=0.0).to(tl.float32)
    scale = tl.exp(gm + mx0)  # A_0 = num0 e^{max0}
    g_num0 = ga * scale
    g_den0 = gb * scale
    g_mx0 = num0 * g_num0 + den0 * g_den0 + tl.where(winner < 0, g_max, 0.0)
    d = dstate_ptr + i_b * 3 * C + c
    tl.store(d, g_num0, mask=mask)
    tl.store(d + C, g_den0, mask=mask)
    tl.store(d + 2 * C, g_mx0, mask=mask)


def _grid(B: int, C: int) -> tuple[tuple[int, int], int]:
    block_c = min(64, triton.next_power_of_2(C))
    return (B, triton.cdiv(C, block_c)), block_c


class Wkv4Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, u, k, v, initial_state):
        B, T, C = k.shape
        k, v = k.contiguous(), v.contiguous()
        decay = -torch.exp(w.float()).contiguous()
        u32 = u.float().contiguous()
        if initial_state is None:
            state = empty_wkv4_state(B, C, k.device)
        else:
            state = initial_state.float().contiguous()
        y = torch.empty_like(v)
        final = torch.empty(B, 3, C, device=k.device, dtype=torch.float32)
        grid, block_c = _grid(B, C)
        _wkv4_fwd_kernel[grid](decay, u32, k, v, state, y, final, T, C, BLOCK_C=block_c)
        ctx.save_for_backward(w, u, k, v, state, decay, u32)
        ctx.has_initial_state = initial_state is not None
        ctx.state_dtype = initial_state.dtype if initial_state is not None else None
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        w, u, k, v, state, decay, u32 = ctx.saved_tensors
        B, T, C = k.shape
        dy = dy.contiguous()
        if dfinal is None:
            dfinal = torch.zeros(B, 3, C, device=k.device, dtype=torch.float32)
        dfinal = dfinal.float().contiguous()
        f32 = dict(device=k.device, dtype=torch.float32)
        dk, dv = torch.empty(B, T, C, **f32), torch.empty(B, T, C, **f32)
        ca, cb, p = (torch.empty(B, T, C, **f32) for _ in range(3))
        ddecay, du, gmax = (torch.empty(B, C, **f32) for _ in range(3))
        winner = torch.empty(B, C, device=k.device, dtype=torch.int32)
        final = torch.empty(B, 3, C, **f32)
        dstate = torch.empty(B, 3, C, **f32)
        grid, block_c = _grid(B, C)
        _wkv4_bwd_forward_pass_kernel[grid](
            decay, u32, k, v, state, dy, dfinal, dk, dv, ca, cb, p, ddecay, du, gmax, winner,
            final, T, C, BLOCK_C=block_c,
        )
        _wkv4_bwd_backward_pass_kernel[grid](
            decay, k, v, state, dfinal, final, ca, cb, p, gmax, winner, dk, dv, dstate, T, C,
            BLOCK_C=block_c,
        )
        dw = (ddecay.sum(0) * decay).to(w.dtype)  # d decay / dw = -e^w = decay
        du = du.sum(0).to(u.dtype)
        dstate = dstate.to(ctx.state_dtype) if ctx.has_initial_state else None
        return dw, du, dk.to(k.dtype), dv.to(v.dtype), dstate


def wkv4_triton(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as `wkv4_reference`; k, v: (B, T, C), w, u: (C,), state (B, 3, C) float32."""
    y, final_state = Wkv4Function.apply(w, u, k, v, initial_state)
    return y, (final_state if output_final_state else None)
