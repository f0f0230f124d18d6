"""Mamba (Gu & Dao 2023): a gated block around a selective state-space scan.

    x, z = in_proj(u);  x = silu(conv1d(x));  dt, B, C = x_proj(x);  dt = dt_proj(dt)
    y = selective_scan(x, dt, A = -exp(A_log), B, C, D, z = z, softplus);  out = out_proj(y)

Parameter names and shapes follow Hugging Face's MambaMixer (and mamba_ssm's Mamba), so those
checkpoints load by name. The state is the convolution's last d_conv - 1 inputs and the SSM state
(d_inner, d_state): one token of decoding costs the same at any context length.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from zoo.kernels import causal_conv1d, compute_dtype, selective_scan

from .base import Mixer, MixerState
from .linear import Linear
from .registry import register_mixer

# the SSM state stays float32 under bf16/fp16 weights (as mamba_ssm keeps it): the compute
# dtype; mamba2 imports the name
state_dtype = compute_dtype


def init_dt_bias(bias: torch.Tensor, dt_min: float, dt_max: float, floor: float) -> None:
    """Set bias so that softplus(bias) is log-uniform in [dt_min, dt_max] (the paper's init)."""
    dt = torch.exp(
        torch.rand_like(bias, dtype=torch.float32) * (math.log(dt_max) - math.log(dt_min))
        + math.log(dt_min)
    ).clamp(min=floor)
    with torch.no_grad():
        bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # the inverse of softplus


@dataclasses.dataclass
class MambaState(MixerState):
    """conv_state: (B, d_conv - 1, d_inner), the last inputs of the convolution, in the model's
    dtype; ssm_state: (B, d_inner, d_state), float32 (float64 for a float64 model)."""

    conv_state: torch.Tensor
    ssm_state: torch.Tensor


@register_mixer("mamba")
class Mamba(Mixer):
    """The Mamba-1 block. x: (B, T, d_model) -> (B, T, d_model); state: `MambaState`."""

    state_class = MambaState
    bounded = True
    test_variants = [
        {"d_state": 8, "d_conv": 3, "expand": 1, "dt_rank": 8, "conv_bias": False, "bias": True},
        {"dt_init": "constant", "dt_scale": 0.5},
    ]

    def __init__(
        self,
        d_model: int,
        layer_idx: int = 0,
        *,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
    ):
        super().__init__(d_model, layer_idx)
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        if not isinstance(dt_rank, int) or dt_rank < 1:
            raise ValueError(f"mamba: dt_rank={dt_rank!r} must be 'auto' or a positive int")
        if dt_init not in ("random", "constant"):
            raise ValueError(f"mamba: dt_init={dt_init!r} is not one of ('random', 'constant')")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"mamba: need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        if d_conv < 2:
            raise ValueError(f"mamba: d_conv={d_conv} must be >= 2")
        self.d_state, self.d_conv, self.dt_rank = d_state, d_conv, dt_rank
        self.d_inner = d_inner = int(expand * d_model)
        self.in_proj = Linear(d_model, 2 * d_inner, bias=bias)
        # an nn.Conv1d only so that checkpoints map by name; the op takes weight[:, 0], (D, W)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, bias=conv_bias,
                                padding=d_conv - 1)
        self.x_proj = Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = Linear(dt_rank, d_inner, bias=True)
        std = dt_rank**-0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                self.dt_proj.weight.fill_(std)
            else:
                self.dt_proj.weight.uniform_(-std, std)
        init_dt_bias(self.dt_proj.bias, dt_min, dt_max, dt_init_floor)
        # S4D-real: A = -(1, 2, ..., d_state) for every channel, stored as log(-A)
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = Linear(d_inner, d_model, bias=bias)

    def init_state(self, batch_size, device=None, dtype=None):
        device = device or self.in_proj.weight.device
        dtype = dtype or self.in_proj.weight.dtype
        return MambaState(
            torch.zeros(batch_size, self.d_conv - 1, self.d_inner, device=device, dtype=dtype),
            torch.zeros(batch_size, self.d_inner, self.d_state, device=device,
                        dtype=state_dtype(dtype)),
        )

    def state_size(self, seq_len, dtype=torch.float32):
        conv = (self.d_conv - 1) * self.d_inner * torch.empty((), dtype=dtype).element_size()
        ssm = self.d_inner * self.d_state * torch.empty((), dtype=state_dtype(dtype)).element_size()
        return conv + ssm

    def forward(self, x, state=None):
        self.check_input(x, state)
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        xs, conv_state = causal_conv1d(
            xs, self.conv1d.weight[:, 0], self.conv1d.bias, activation="silu",
            initial_state=state.conv_state if state is not None else None,
            output_final_state=True,
        )
        dt, B, C = self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        # dt_proj's bias rides into the scan, where it is fused with the softplus
        dt = F.linear(dt, self.dt_proj.weight)
        y, ssm_state = selective_scan(
            xs.transpose(1, 2), dt.transpose(1, 2), -torch.exp(self.A_log.float()),
            B.transpose(1, 2), C.transpose(1, 2), D=self.D.float(), z=z.transpose(1, 2),
            delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            initial_state=state.ssm_state if state is not None else None,
            output_final_state=True,
        )
        # the carried state leaves the autograd graph, as attention's KV cache does
        new_state = MambaState(conv_state.detach(), ssm_state.detach())
        return self.out_proj(y.transpose(1, 2)), new_state
