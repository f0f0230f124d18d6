"""The CPU path: the selective scan in chunks of a few steps, with a hand-written backward.

Within a chunk of L steps the log-decays a_t = dt_t * A are summed (cs_t = a_1 + ... + a_t) and
every pair s <= t gets the decay exp(cs_t - cs_s), masked to the lower triangle before the
exponential, so with a_t <= 0 (dt >= 0 and A <= 0, as in Mamba) only partial sums <= 0 are ever
exponentiated: no overflow however long T is.

    h_t = sum_{s <= t} exp(cs_t - cs_s) dt_s u_s B_s  +  exp(cs_t) h_start

The state is carried across chunks by a Python loop over chunks (never over single steps). The
pairwise work grows with L and the loop overhead with T / L; a few steps per chunk is the
measured optimum on the CPU (tensors of one chunk stay in cache).

The backward runs the same chunks in reverse: dL/dh_t obeys the transposed recurrence
g_t = C_t dy_t + exp(a_{t+1}) g_{t+1}, whose pairwise decays are the forward's matrix read
column-wise. States inside a chunk are recomputed from the chunk-start states that the forward
saved, so memory is O(B D N T / L), never the O(B D N T) of all states.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..precision import compute_dtype

DEFAULT_CHUNK = 4


def _as_groups(BC: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, N, T) or (B, G, N, T) -> (B, G, 1, T, N): broadcasts over the channels of a group."""
    if BC.dim() == 3:
        BC = BC[:, None]
    return BC.to(dtype).transpose(-1, -2).contiguous()[:, :, None]


def _chunk_states(a, x, Bc, start_state, mask):
    """All states of one chunk. a: log-decays (b, g, p, l, n); x = dt * u: (b, g, p, l);
    Bc: (b, g, 1, l, n); start_state: (b, g, p, n). Returns states (b, g, p, l, n), the pairwise
    decays W (b, g, p, l, l, n) and alpha_0 = exp(a_0) (b, g, p, 1, n)."""
    cs = a.cumsum(-2)
    # W[..., t, s, n] = exp(cs_t - cs_s) for s <= t: the decay from after step s to step t.
    # Its first column times exp(a_0) is the decay from the chunk start; exp runs once.
    seg = cs[..., :, None, :] - cs[..., None, :, :]
    W = seg.masked_fill_(mask, float("-inf")).exp_()
    alpha0 = a[..., :1, :].exp()
    beta = x[..., None] * Bc
    states = (W * beta[..., None, :, :]).sum(-2) + (W[..., :, 0, :] * alpha0) * start_state[
        ..., None, :]
    return states, W, alpha0


class SelectiveScanChunked(torch.autograd.Function):
    """The scan core y_t = C_t . h_t with its final state; dt, D, z are applied outside.

    u, dt: (b, d, T) in the compute dtype; A: (d, n); B, C: (b, g, n, T) or (b, n, T);
    h0: (b, d, n) or None. Returns y (b, d, T) and the final state (b, d, n).
    """

    @staticmethod
    def forward(ctx, u, dt, A, B, C, h0, chunk_size: int):
        batch, dim, T = u.shape
        n = A.shape[1]
        groups = 1 if B.dim() == 3 else B.shape[1]
        per = dim // groups
        dtype = u.dtype
        u4, dt4 = u.reshape(batch, groups, per, T), dt.reshape(batch, groups, per, T)
        A4 = A.reshape(groups, per, 1, n)
        Bt, Ct = _as_groups(B, dtype), _as_groups(C, dtype)
        x = dt4 * u4
        state = (h0.reshape(batch, groups, per, n) if h0 is not None
                 else u.new_zeros(batch, groups, per, n))
        L = max(1, min(chunk_size, T))
        mask = torch.ones(L, L, dtype=torch.bool, device=u.device).triu(1)[:, :, None]
        y = u.new_empty(batch, groups, per, T)
        starts = []
        for s in range(0, T, L):
            e = min(s + L, T)
            starts.append(state)
            a = dt4[..., s:e, None] * A4
            states, _, _ = _chunk_states(a, x[..., s:e], Bt[..., s:e, :], state,
                                         mask[: e - s, : e - s])
            y[..., s:e] = (states * Ct[..., s:e, :]).sum(-1)
            state = states[..., -1, :]
        ctx.save_for_backward(u, dt, A, B, C, torch.stack(starts))
        ctx.chunk, ctx.has_h0 = L, h0 is not None
        # the final state is a slice of the last chunk's states: a copy keeps only itself alive
        return y.reshape(batch, dim, T), state.reshape(batch, dim, n).clone()

    @staticmethod
    def backward(ctx, dy, dhT):
        u, dt, A, B, C, starts = ctx.saved_tensors
        batch, dim, T = u.shape
        n = A.shape[1]
        groups = 1 if B.dim() == 3 else B.shape[1]
        per = dim // groups
        dtype = u.dtype
        u4, dt4 = u.reshape(batch, groups, per, T), dt.reshape(batch, groups, per, T)
        A4 = A.reshape(groups, per, 1, n)
        Bt, Ct = _as_groups(B, dtype), _as_groups(C, dtype)
        x = dt4 * u4
        dy4 = (dy.to(dtype) if dy is not None else u.new_zeros(batch, dim, T)).reshape(
            batch, groups, per, T)
        # g_carry = dL/dh at the end of the current chunk coming from later steps
        g_carry = (dhT.to(dtype).reshape(batch, groups, per, n) if dhT is not None
                   else u.new_zeros(batch, groups, per, n))
        du, ddt = torch.empty_like(u4), torch.empty_like(dt4)
        dA = u.new_zeros(groups, per, n)
        dB, dC = u.new_empty(batch, groups, T, n), u.new_empty(batch, groups, T, n)
        L = ctx.chunk
        mask = torch.ones(L, L, dtype=torch.bool, device=u.device).triu(1)[:, :, None]
        bounds = [(s, min(s + L, T)) for s in range(0, T, L)]
        for c in range(len(bounds) - 1, -1, -1):
            s, e = bounds[c]
            start = starts[c]
            a = dt4[..., s:e, None] * A4
            Bc, Cc, dyc = Bt[..., s:e, :], Ct[..., s:e, :], dy4[..., s:e]
            states, W, alpha0 = _chunk_states(a, x[..., s:e], Bc, start,
                                              mask[: e - s, : e - s])
            # g_t = sum_{r >= t} exp(cs_r - cs_t) C_r dy_r + exp(cs_end - cs_t) g_carry:
            # the forward's decays read column-wise, the last row being the decay to the end
            Gc = dyc[..., None] * Cc
            g = (W * Gc[..., :, None, :]).sum(-3) + W[..., -1, :, :] * g_carry[..., None, :]
            dC[:, :, s:e] = (states * dyc[..., None]).sum(2)
            prev = torch.cat([start[..., None, :], states[..., :-1, :]], dim=-2)
            # exp(a_t) for t >= 1 is W's subdiagonal
            sub = torch.diagonal(W, offset=-1, dim1=-3, dim2=-2).transpose(-1, -2)
            alpha = torch.cat([alpha0, sub], dim=-2)
            # d/d(a_t) of exp(a_t) h_{t-1}: the gradient of every log-decay
            da = g * prev * alpha
            dA += (da * dt4[..., s:e, None]).sum((0, 3))
            gB = (g * Bc).sum(-1)
            du[..., s:e] = dt4[..., s:e] * gB
            ddt[..., s:e] = (da * A4).sum(-1) + u4[..., s:e] * gB
            dB[:, :, s:e] = (g * x[..., s:e, None]).sum(2)
            g_carry = alpha[..., 0, :] * g[..., 0, :]
        dB, dC = dB.transpose(-1, -2), dC.transpose(-1, -2)
        if B.dim() == 3:
            dB, dC = dB[:, 0], dC[:, 0]
        dh0 = g_carry.reshape(batch, dim, n) if ctx.has_h0 else None
        return (du.reshape(batch, dim, T), ddt.reshape(batch, dim, T), dA.reshape(dim, n), dB, dC,
                dh0, None)


def selective_scan_chunked(
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
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as `selective_scan_reference`; the scan core is `SelectiveScanChunked`."""
    dtype = compute_dtype(u.dtype)
    dt = time_steps(delta, delta_bias, delta_softplus, dtype)
    uf = u.to(dtype)
    h0 = initial_state.to(dtype) if initial_state is not None else None
    y, final_state = SelectiveScanChunked.apply(uf, dt, A.to(dtype), B.to(dtype), C.to(dtype), h0,
                                                chunk_size)
    return skip_and_gate(y, uf, D, z).to(u.dtype), (final_state if output_final_state else None)


def time_steps(delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool,
               dtype: torch.dtype) -> torch.Tensor:
    """dt = softplus(delta + delta_bias) (each part when asked), (B, D, T) in `dtype`."""
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    return dt


def skip_and_gate(y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None,
                  z: torch.Tensor | None) -> torch.Tensor:
    """(y + D * u) * silu(z) (each term when given), in y's dtype; y, u, z: (B, D, T)."""
    if D is not None:
        y = y + D.to(y.dtype)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y
