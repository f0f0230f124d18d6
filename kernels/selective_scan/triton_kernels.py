"""Triton forward and backward of the selective scan, in one autograd Function.

As mamba's CUDA kernel: a program owns one sequence and a block of BLOCK_D channels, keeps
their (BLOCK_D, N) state in registers and walks the time steps in order. The forward writes the
state at the start of every CHUNK steps (checkpoints, O(B D N T / CHUNK) memory). The backward
walks the chunks in reverse: it recomputes a chunk's states from its checkpoint into a scratch
buffer, then runs the transposed recurrence g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1} backwards
through the chunk. dt's bias and softplus, D and the silu(z) gate are fused in both directions.

A block never straddles two groups of B and C, so each program reduces dB and dC over its own
channels and writes one partial per block; the few partials are summed in PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 32


@triton.jit
def _softplus(x):
    # log(1 + e^x); below -5 a series keeps the relative precision log(1 + tiny) loses
    e = tl.exp(tl.minimum(x, 20.0))
    series = e * (1.0 - e * (0.5 - e / 3.0))
    return tl.where(x > 20.0, x, tl.where(x < -5.0, series, tl.log(1.0 + e)))


@triton.jit
def _ss_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
    y_ptr, hT_ptr, ckpt_ptr,
    T, DIM, N, G, PER, N_CHUNKS,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    i_b, i_d = tl.program_id(0), tl.program_id(1)
    d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    mask_d, mask_n = d < DIM, n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    grp = (i_d * BLOCK_D) // PER
    A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    state_off = i_b * DIM * N + d[:, None] * N + n[None, :]
    if HAS_H0:
        h = tl.load(h0_ptr + state_off, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
    seq = i_b * DIM * T + d * T
    bc = (i_b * G + grp) * N * T + n * T
    for t in range(T):
        if t % CHUNK == 0:
            tl.store(ckpt_ptr + (i_b * N_CHUNKS + t // CHUNK) * DIM * N + d[:, None] * N
                     + n[None, :], h, mask=mask_dn)
        u = tl.load(u_ptr + seq + t, mask=mask_d, other=0.0).to(tl.float32)
        dt = tl.load(delta_ptr + seq + t, mask=mask_d, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt += bias
        if SOFTPLUS:
            dt = _softplus(dt)
        Bt = tl.load(B_ptr + bc + t, mask=mask_n, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + bc + t, mask=mask_n, other=0.0).to(tl.float32)
        h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
        y = tl.sum(h * Ct[None, :], axis=1)
        if HAS_D:
            y += Dv * u
        if HAS_Z:
            z = tl.load(z_ptr + seq + t, mask=mask_d, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(y_ptr + seq + t, y.to(y_ptr.dtype.element_ty), mask=mask_d)
    tl.store(hT_ptr + state_off, h, mask=mask_dn)


@triton.jit
def _ss_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ckpt_ptr, dy_ptr, dhT_ptr,
    scratch_ptr, du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dD_ptr, dbias_ptr, dB_ptr, dC_ptr, dh0_ptr,
    T, DIM, N, G, PER, N_CHUNKS, N_BLOCKS,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DHT: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    i_b, i_d = tl.program_id(0), tl.program_id(1)
    d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    mask_d, mask_n = d < DIM, n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    grp = (i_d * BLOCK_D) // PER
    A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    state_off = i_b * DIM * N + d[:, None] * N + n[None, :]
    # g = dL/dh_t, accumulated backwards in time
    if HAS_DHT:
        g = tl.load(dhT_ptr + state_off, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        g = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=mask_d, other=0.0).to(tl.float32)
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    seq = i_b * DIM * T + d * T
    bc = (i_b * G + grp) * N * T + n * T
    part = (i_b * N_BLOCKS + i_d) * N * T + n * T
    # this program's scratch rows: the CHUNK + 1 states h_{t0 - 1}, ..., h_{t1 - 1} of a chunk
    scratch = scratch_ptr + (i_b * DIM + d[:, None]) * (CHUNK + 1) * N + n[None, :]
    for ci in range(N_CHUNKS):
        c = N_CHUNKS - 1 - ci
        t0 = c * CHUNK
        steps = tl.minimum(CHUNK, T - t0)
        h = tl.load(ckpt_ptr + (i_b * N_CHUNKS + c) * DIM * N + d[:, None] * N + n[None, :],
                    mask=mask_dn, other=0.0)
        tl.store(scratch, h, mask=mask_dn)
        for i in range(steps):
            t = t0 + i
            u = tl.load(u_ptr + seq + t, mask=mask_d, other=0.0).to(tl.float32)
            dt = tl.load(delta_ptr + seq + t, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt += bias
            if SOFTPLUS:
                dt = _softplus(dt)
            Bt = tl.load(B_ptr + bc + t, mask=mask_n, other=0.0).to(tl.float32)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
            tl.store(scratch + (i + 1) * N, h, mask=mask_dn)
        tl.debug_barrier()
        for j in range(steps):
            i = steps - 1 - j
            t = t0 + i
            h_t = tl.load(scratch + (i + 1) * N, mask=mask_dn, other=0.0)
            h_prev = tl.load(scratch + i * N, mask=mask_dn, other=0.0)
            u = tl.load(u_ptr + seq + t, mask=mask_d, other=0.0).to(tl.float32)
            raw = tl.load(delta_ptr + seq + t, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_BIAS:
                raw += bias
            if SOFTPLUS:
                dt = _softplus(raw)
            else:
                dt = raw
            Bt = tl.load(B_ptr + bc + t, mask=mask_n, other=0.0).to(tl.float32)
            Ct = tl.load(C_ptr + bc + t, mask=mask_n, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + seq + t, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_Z:
                y = tl.sum(h_t * Ct[None, :], axis=1)
                if HAS_D:
                    y += Dv * u
                z = tl.load(z_ptr + seq + t, mask=mask_d, other=0.0).to(tl.float32)
                sig = tl.sigmoid(z)
                dz = dy * y * sig * (1.0 + z * (1.0 - sig))
                tl.store(dz_ptr + seq + t, dz.to(dz_ptr.dtype.element_ty), mask=mask_d)
                dy = dy * z * sig
            du = tl.zeros((BLOCK_D,), dtype=tl.float32)
            if HAS_D:
                dD_acc += dy * u
                du = dy * Dv
            tl.store(dC_ptr + part + t, tl.sum(dy[:, None] * h_t, axis=0), mask=mask_n)
            g += dy[:, None] * Ct[None, :]
            alpha = tl.exp(dt[:, None] * A)
            da = g * h_prev * alpha  # dL/d(dt A) through exp(dt A) h_{t-1}
            dA_acc += da * dt[:, None]
            gB = tl.sum(g * Bt[None, :], axis=1)
            du += dt * gB
            ddt = tl.sum(da * A, axis=1) + u * gB
            tl.store(dB_ptr + part + t, tl.sum(g * (dt * u)[:, None], axis=0), mask=mask_n)
            if SOFTPLUS:
                ddt = ddt * tl.sigmoid(raw)
            dbias_acc += ddt
            tl.store(du_ptr + seq + t, du.to(du_ptr.dtype.element_ty), mask=mask_d)
            tl.store(ddelta_ptr + seq + t, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask_d)
            g = g * alpha
        tl.debug_barrier()
    tl.store(dh0_ptr + state_off, g, mask=mask_dn)
    tl.store(dA_ptr + state_off, dA_acc, mask=mask_dn)
    tl.store(dD_ptr + i_b * DIM + d, dD_acc, mask=mask_d)
    tl.store(dbias_ptr + i_b * DIM + d, dbias_acc, mask=mask_d)


def _block_d(per: int) -> int:
    """The largest power of two <= 64 dividing the channels per group: blocks stay in a group."""
    block = 1
    while block < 64 and per % (block * 2) == 0:
        block *= 2
    return block


class SelectiveScanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, h0, softplus: bool):
        batch, dim, T = u.shape
        N = A.shape[1]
        B4 = (B[:, None] if B.dim() == 3 else B).contiguous()
        C4 = (C[:, None] if C.dim() == 3 else C).contiguous()
        G = B4.shape[1]
        per = dim // G
        block_d = _block_d(per)
        u, delta, A = u.contiguous(), delta.contiguous(), A.contiguous()
        z = z.contiguous() if z is not None else None
        n_chunks = triton.cdiv(T, CHUNK)
        y = torch.empty_like(u)
        hT = torch.empty(batch, dim, N, device=u.device, dtype=torch.float32)
        ckpt = torch.empty(batch, n_chunks, dim, N, device=u.device, dtype=torch.float32)
        h0c = h0.contiguous() if h0 is not None else None
        grid = (batch, dim // block_d)
        _ss_fwd_kernel[grid](
            u, delta, A, B4, C4, D if D is not None else u, z if z is not None else u,
            delta_bias if delta_bias is not None else u, h0c if h0c is not None else u,
            y, hT, ckpt, T, dim, N, G, per, n_chunks,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=softplus, HAS_H0=h0 is not None, CHUNK=CHUNK, BLOCK_D=block_d,
            BLOCK_N=triton.next_power_of_2(N),
        )
        ctx.save_for_backward(u, delta, A, B4, C4, D, z, delta_bias, ckpt)
        ctx.softplus, ctx.b_dim, ctx.has_h0 = softplus, B.dim(), h0 is not None
        ctx.h0_dtype = h0.dtype if h0 is not None else None
        return y, hT

    @staticmethod
    def backward(ctx, dy, dhT):
        u, delta, A, B4, C4, D, z, delta_bias, ckpt = ctx.saved_tensors
        batch, dim, T = u.shape
        N, G = A.shape[1], B4.shape[1]
        per = dim // G
        block_d = _block_d(per)
        n_blocks = dim // block_d
        n_chunks = ckpt.shape[1]
        dev, f32 = u.device, torch.float32
        dy = dy.contiguous() if dy is not None else torch.zeros_like(u)
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = torch.empty_like(z) if z is not None else None
        dA = torch.empty(batch, dim, N, device=dev, dtype=f32)
        dD = torch.empty(batch, dim, device=dev, dtype=f32)
        dbias = torch.empty(batch, dim, device=dev, dtype=f32)
        dB = torch.empty(batch, n_blocks, N, T, device=dev, dtype=f32)
        dC = torch.empty(batch, n_blocks, N, T, device=dev, dtype=f32)
        dh0 = torch.empty(batch, dim, N, device=dev, dtype=f32)
        scratch = torch.empty(batch, dim, CHUNK + 1, N, device=dev, dtype=f32)
        _ss_bwd_kernel[(batch, n_blocks)](
            u, delta, A, B4, C4, D if D is not None else u, z if z is not None else u,
            delta_bias if delta_bias is not None else u, ckpt, dy,
            dhT.contiguous() if dhT is not None else u, scratch, du, ddelta,
            dz if dz is not None else du, dA, dD, dbias, dB, dC, dh0,
            T, dim, N, G, per, n_chunks, n_blocks,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=ctx.softplus, HAS_DHT=dhT is not None, CHUNK=CHUNK, BLOCK_D=block_d,
            BLOCK_N=triton.next_power_of_2(N),
        )
        # blocks of one group are consecutive: sum their partials into the group's gradient
        dB = dB.view(batch, G, n_blocks // G, N, T).sum(2)
        dC = dC.view(batch, G, n_blocks // G, N, T).sum(2)
        if ctx.b_dim == 3:
            dB, dC = dB[:, 0], dC[:, 0]
        return (
            du, ddelta, dA.sum(0).to(A.dtype), dB.to(B4.dtype), dC.to(C4.dtype),
            dD.sum(0).to(D.dtype) if D is not None else None, dz,
            dbias.sum(0).to(delta_bias.dtype) if delta_bias is not None else None,
            dh0.to(ctx.h0_dtype) if ctx.has_h0 else None, None,
        )


def selective_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as `selective_scan_reference`; the state is float32."""
    y, final_state = SelectiveScanFunction.apply(u, delta, A, B, C, D, z, delta_bias,
                                                 initial_state, delta_softplus)
    return y, (final_state if output_final_state else None)
