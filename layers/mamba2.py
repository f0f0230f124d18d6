"""Mamba-2 (Dao & Gu 2024): the SSD block. A scalar decay per head turns the selective scan into
linear attention with a data-dependent decay, so the scan is zoo's `linear_attention` op:

    z, xBC, dt = in_proj(u);  x, B, C = silu(conv1d(xBC));  dt = softplus(dt + dt_bias)
    y = SSD(q = C, k = B, v = x * dt, log-decay = dt * A) + D * x
    out = out_proj(norm(y * silu(z)))

with A = -exp(A_log) one scalar per head, B and C shared by the heads of a group, and a gated
RMSNorm normalising each group's channels. Parameter names follow Hugging Face's Mamba2Mixer
(in_proj, conv1d, dt_bias, A_log, D, norm.weight, out_proj), so checkpoints map by name.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from zoo.kernels import causal_conv1d, linear_attention
from zoo.kernels.linear_attention.torch_chunked import log_decay_floor

from .base import Mixer, MixerState, fill_padding
from .linear import Linear
from .mamba import init_dt_bias, masked_causal_conv1d, state_dtype
from .registry import register_mixer


class GatedRMSNorm(nn.Module):
    """weight * rms_norm(y * silu(z)) over groups of `group_size` channels, in float32.

    y, z: (..., dim). Mamba-2 normalises each of its n_groups groups separately (group_size =
    d_inner / n_groups), gating before normalising as transformers and mamba_ssm do.
    """

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size, self.eps = group_size, eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = y.float() * F.silu(z.float())
        h = rearrange(h, "... (g c) -> ... g c", c=self.group_size)
        h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + self.eps)
        return self.weight * rearrange(h, "... g c -> ... (g c)").to(y.dtype)


@dataclasses.dataclass
class Mamba2State(MixerState):
    """conv_state: (B, d_conv - 1, d_inner + 2 * n_groups * d_state), the convolution's last
    inputs, in the model's dtype; ssm_state: (B, n_heads, d_state, head_dim), float32 (float64
    for a float64 model), laid out as linear_attention's (B, H, K, V) state."""

    conv_state: torch.Tensor
    ssm_state: torch.Tensor


@register_mixer("mamba2")
class Mamba2(Mixer):
    """The Mamba-2 block. x: (B, T, d_model) -> (B, T, d_model); state: `Mamba2State`."""

    state_class = Mamba2State
    bounded = True
    test_variants = [
        {"d_state": 16, "head_dim": 16, "n_groups": 2, "chunk_size": 8},
        {"d_state": 8, "head_dim": 32, "expand": 1, "d_conv": 3, "conv_bias": False,
         "bias": True, "dt_limit": [0.0, 0.05]},
    ]

    def __init__(
        self,
        d_model: int,
        layer_idx: int = 0,
        *,
        d_state: int = 64,
        d_conv: int = 4,
        expand: int = 2,
        head_dim: int = 64,
        n_groups: int = 1,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: list[float] | tuple[float, float] | None = None,
        A_init_range: list[float] | tuple[float, float] = (1.0, 16.0),
        conv_bias: bool = True,
        bias: bool = False,
        norm_eps: float = 1e-5,
        chunk_size: int = 64,
    ):
        super().__init__(d_model, layer_idx)
        d_inner = int(expand * d_model)
        if d_inner % head_dim:
            raise ValueError(f"mamba2: d_inner = expand * d_model = {d_inner} is not divisible "
                             f"by head_dim={head_dim}")
        n_heads = d_inner // head_dim
        if n_heads % n_groups:
            raise ValueError(f"mamba2: n_heads={n_heads} (d_inner / head_dim) is not divisible "
                             f"by n_groups={n_groups}")
        if d_conv < 2:
            raise ValueError(f"mamba2: d_conv={d_conv} must be >= 2")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"mamba2: need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        if dt_limit is not None and (len(dt_limit) != 2 or not dt_limit[0] < dt_limit[1]):
            raise ValueError(f"mamba2: dt_limit={dt_limit!r} must be [low, high] with low < high")
        self.d_inner, self.d_state, self.d_conv = d_inner, d_state, d_conv
        self.head_dim, self.n_heads, self.n_groups = head_dim, n_heads, n_groups
        self.dt_limit = tuple(dt_limit) if dt_limit is not None else None
        self.chunk_size = chunk_size
        self.conv_dim = d_inner + 2 * n_groups * d_state
        # one projection, split in transformers' order: z, xBC, dt
        self.in_proj = Linear(d_model, d_inner + self.conv_dim + n_heads, bias=bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim,
                                bias=conv_bias, padding=d_conv - 1)
        self.dt_bias = nn.Parameter(torch.empty(n_heads))
        init_dt_bias(self.dt_bias, dt_min, dt_max, dt_init_floor)
        low, high = A_init_range
        A = torch.empty(n_heads, dtype=torch.float32).uniform_(low, high)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(n_heads))
        self.norm = GatedRMSNorm(d_inner, d_inner // n_groups, norm_eps)
        self.out_proj = Linear(d_inner, d_model, bias=bias)

    def init_state(self, batch_size, device=None, dtype=None):
        device = device or self.in_proj.weight.device
        dtype = dtype or self.in_proj.weight.dtype
        return Mamba2State(
            torch.zeros(batch_size, self.d_conv - 1, self.conv_dim, device=device, dtype=dtype),
            torch.zeros(batch_size, self.n_heads, self.d_state, self.head_dim, device=device,
                        dtype=state_dtype(dtype)),
        )

    def state_size(self, seq_len, dtype=torch.float32):
        conv = (self.d_conv - 1) * self.conv_dim * torch.empty((), dtype=dtype).element_size()
        ssm_element = torch.empty((), dtype=state_dtype(dtype)).element_size()
        return conv + self.n_heads * self.d_state * self.head_dim * ssm_element

    def forward(self, x, state=None, padding_mask=None):
        self.check_input(x, state)
        z, xBC, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        conv_state = state.conv_state if state is not None else None
        if padding_mask is None:
            xBC, conv_state = causal_conv1d(
                xBC, self.conv1d.weight[:, 0], self.conv1d.bias, activation="silu",
                initial_state=conv_state, output_final_state=True,
            )
        else:
            xBC, conv_state = masked_causal_conv1d(
                xBC, self.conv1d.weight[:, 0], self.conv1d.bias, activation="silu",
                initial_state=conv_state, padding_mask=padding_mask,
            )
        xs, B, C = xBC.split([self.d_inner, self.n_groups * self.d_state,
                              self.n_groups * self.d_state], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())  # (B, T, H)
        if self.dt_limit is not None:
            dt = dt.clamp(*self.dt_limit)
        # dt = 0 at a padded step: decay exp(dt A) = 1 and value x dt = 0, the state untouched
        dt = fill_padding(dt, padding_mask)
        xs = rearrange(xs, "b t (h p) -> b t h p", p=self.head_dim)
        # each group's B and C serve n_heads / n_groups consecutive heads
        per_group = self.n_heads // self.n_groups
        B = rearrange(B, "b t (g n) -> b t g n", g=self.n_groups).repeat_interleave(per_group, 2)
        C = rearrange(C, "b t (g n) -> b t g n", g=self.n_groups).repeat_interleave(per_group, 2)
        A = -torch.exp(self.A_log.float())
        y, ssm_state = linear_attention(
            C, B, xs * dt[..., None].to(xs.dtype), decay=dt * A,
            initial_state=state.ssm_state if state is not None else None,
            output_final_state=True, chunk_size=self.chunk_size,
        )
        y = y + xs * self.D.to(xs.dtype)[:, None]
        y = self.norm(rearrange(y, "b t h p -> b t (h p)"), z)
        new_state = Mamba2State(conv_state.detach(), ssm_state.detach())
        return fill_padding(self.out_proj(y), padding_mask), new_state

    def step_in_place(self, x: torch.Tensor, state: Mamba2State) -> torch.Tensor:
        """`forward` of one unpadded token, x (B, 1, d_model) -> y (B, 1, d_model), with
        `state` updated in place rather than returned anew (zoo.infer.Engine's slot pool holds
        it): the same ops as the T = 1 path, less the fresh state-sized tensors a step would
        otherwise allocate for the decayed state, the outer product and their sum."""
        z, xBC, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        xBC, conv_state = causal_conv1d(
            xBC, self.conv1d.weight[:, 0], self.conv1d.bias, activation="silu",
            initial_state=state.conv_state, output_final_state=True)
        state.conv_state.copy_(conv_state)
        group_channels = self.n_groups * self.d_state
        xs, B, C = xBC[:, 0].split([self.d_inner, group_channels, group_channels], dim=-1)
        dt = F.softplus(dt[:, 0].float() + self.dt_bias.float())  # (B, H)
        if self.dt_limit is not None:
            dt = dt.clamp(*self.dt_limit)
        ssm = state.ssm_state  # (B, H, N, P), float32 (float64 for float64)
        dtype, rows, heads_per_group = ssm.dtype, x.shape[0], self.n_heads // self.n_groups
        xs = xs.reshape(rows, self.n_heads, self.head_dim)
        log_decay = (dt * -torch.exp(self.A_log.float())).to(dtype)
        log_decay = log_decay.clamp(min=log_decay_floor(dtype))
        values = (xs * dt[..., None].to(xs.dtype)).to(dtype)
        # heads grouped (B, G, H / G, N, P): each group's B and C serve its heads by broadcasting
        grouped = ssm.view(rows, self.n_groups, heads_per_group, self.d_state, self.head_dim)
        ssm.mul_(torch.exp(log_decay)[:, :, None, None])
        keys = B.reshape(rows, self.n_groups, 1, self.d_state, 1).to(dtype)
        grouped.addcmul_(keys, values.view(rows, self.n_groups, heads_per_group, 1, -1))
        queries = C.reshape(rows, self.n_groups, 1, 1, self.d_state).to(dtype)
        y = torch.matmul(queries, grouped).reshape(rows, self.n_heads, self.head_dim)
        y = y.to(xs.dtype) + xs * self.D.to(xs.dtype)[:, None]
        y = self.norm(y.reshape(rows, 1, self.d_inner), z)
        return self.out_proj(y)


__all__ = ["GatedRMSNorm", "Mamba2", "Mamba2State"]
