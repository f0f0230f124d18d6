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

from .base import Mixer, MixerState, check_padding_mask, fill_padding
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


def along_time(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, T, ...) at the time positions index (B, T') of each row: (B, T', ...)."""
    index = index.reshape(*index.shape, *([1] * (x.dim() - 2)))
    return x.gather(1, index.expand(-1, -1, *x.shape[2:]))


def real_tokens_first(padding_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, lengths) for a padded batch, padding_mask (B, T) True at real tokens: order
    (B, T) holds each row's real positions in time order, then its padded ones; lengths (B,)
    counts the real tokens. Packed by `order`, every row's real tokens stand where they would
    stand alone, so anything causal computes them exactly, whatever the padding after them."""
    order = torch.argsort((~padding_mask).to(torch.uint8), dim=1, stable=True)
    return order, padding_mask.sum(1)


def masked_causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    activation: str | None,
    initial_state: torch.Tensor | None,
    padding_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`causal_conv1d` over each row's real tokens only: a padded position neither enters the
    window nor shifts it. x (B, T, D), weight (D, W), padding_mask (B, T) True at real tokens.

    Returns y (B, T, D), zero at the padded positions, and the last W - 1 real inputs of each
    row after the initial state (B, W - 1, D): the window a row alone would carry on with.
    """
    check_padding_mask(x, padding_mask, "causal conv1d")
    B, T, D = x.shape
    if initial_state is None:
        initial_state = x.new_zeros(B, weight.shape[1] - 1, D)
    order, lengths = real_tokens_first(padding_mask)
    # the padding, packed after the real tokens, reaches no real output and no window; zeroed,
    # whatever it holds cannot overflow an activation there either
    real = torch.arange(T, device=x.device) < lengths[:, None]
    packed = fill_padding(along_time(x, order), real)
    y, _ = causal_conv1d(packed, weight, bias, activation=activation,
                         initial_state=initial_state, output_final_state=False)
    y = fill_padding(along_time(y, torch.argsort(order, dim=1)), padding_mask)
    history = torch.cat([initial_state.to(x.dtype), packed], dim=1)
    window = lengths[:, None] + torch.arange(weight.shape[1] - 1, device=x.device)
    return y, along_time(history, window)


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

    def forward(self, x, state=None, padding_mask=None):
        self.check_input(x, state)
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        conv_state = state.conv_state if state is not None else None
        if padding_mask is None:
            xs, conv_state = causal_conv1d(
                xs, self.conv1d.weight[:, 0], self.conv1d.bias, activation="silu",
                initial_state=conv_state, output_final_state=True,
            )
        else:
            xs, conv_state = masked_causal_conv1d(
                xs, self.conv1d.weight[:, 0], self.conv1d.bias, activation="silu",
                initial_state=conv_state, padding_mask=padding_mask,
            )
        dt, B, C = self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        # dt_proj's bias rides into the scan, where it is fused with the softplus
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)
        delta_bias, delta_softplus = self.dt_proj.bias.float(), True
        if padding_mask is not None:
            # dt = 0 at a padded step: exp(dt A) = 1 and dt B u = 0 leave the state as it was;
            # the scan's own softplus, taken here (in its dtype) so that the zero can follow it
            acc = state_dtype(xs.dtype)
            dt = F.softplus(dt.to(acc) + delta_bias.to(acc)[:, None])
            dt = torch.where(padding_mask[:, None], dt, 0.0)
            delta_bias, delta_softplus = None, False
        y, ssm_state = selective_scan(
            xs.transpose(1, 2), dt, -torch.exp(self.A_log.float()),
            B.transpose(1, 2), C.transpose(1, 2), D=self.D.float(), z=z.transpose(1, 2),
            delta_bias=delta_bias, delta_softplus=delta_softplus,
            initial_state=state.ssm_state if state is not None else None,
            output_final_state=True,
        )
        # the carried state leaves the autograd graph, as attention's KV cache does
        new_state = MambaState(conv_state.detach(), ssm_state.detach())
        return fill_padding(self.out_proj(y.transpose(1, 2)), padding_mask), new_state
