"""DeltaNet (Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length"), and the layout it shares with Gated DeltaNet (`gated_deltanet.py`) and Kimi
Delta Attention (`kda.py`):

    q, k, v = silu(conv1d([q_proj x | k_proj x | v_proj x]))   a short causal conv over time
    q, k = q / |q|, k / |k|                                    per head
    beta = sigmoid(b_proj x)                                   one writing strength per head
    o, S = delta_rule(q, k, v, beta, decay = log_decay(x))     S: (B, H, K, V), float32
    y = o_proj(o_norm(o, gate(x)))                             RMSNorm per head, gated or not

The state S is corrected towards each value instead of summed (see `zoo.kernels.delta_rule`),
so a key written twice keeps its latest value; with |k| = 1 and beta in [0, 1] the update is a
contraction and S stays bounded. DeltaNet has no decay and, by default, no output gate (fla's
DeltaNet layout). The three convolutions of fla's layout are one depthwise conv over the
concatenated channels here, as Qwen3-Next and transformers' Kimi Linear hold them: one op call
and one conv state. The mixer's state is that conv window and S, a fixed size at any length.
Under bf16 weights everything between the projections and o_proj runs in float32.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from zoo.kernels import causal_conv1d, compute_dtype
from zoo.kernels.delta_rule import delta_rule

from .base import Mixer, MixerState, check_padding_mask, fill_padding
from .linear import Linear
from .mamba import masked_causal_conv1d
from .registry import register_mixer

# fla's and transformers' l2norm epsilon, added to the squared norm
L2_NORM_EPS = 1e-6
GATE_ACTIVATIONS = {"silu": F.silu, "sigmoid": torch.sigmoid}


def l2_normalize(x: torch.Tensor, eps: float = L2_NORM_EPS) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, computed in float32 (float64 stays float64)
    and returned in x's dtype. x: (B, T, H, K)."""
    h = x.to(compute_dtype(x.dtype))
    return (h * torch.rsqrt(h.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


class HeadRMSNorm(nn.Module):
    """weight * rms_norm(o) over each head's V channels, times act(gate) when a gate is given
    (normalise, then gate: fla's FusedRMSNormGated, Qwen3-Next's and Kimi Linear's gated norms).
    o, gate: (B, T, H, V). Computed in float32 (float64 stays float64), returned in o's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5, gate_activation: str = "silu"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.gate_activation = GATE_ACTIVATIONS[gate_activation]

    def forward(self, o: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        dtype = compute_dtype(o.dtype)
        h = o.to(dtype)
        h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + self.eps) * self.weight.to(dtype)
        if gate is not None:
            h = h * self.gate_activation(gate.to(dtype))
        return h.to(o.dtype)


@dataclasses.dataclass
class DeltaRuleState(MixerState):
    """conv_state: (B, conv_size - 1, 2 * H_k * K + H * V), the short convolution's last
    inputs in the model's dtype, or None without the convolution; recurrent_state: (B, H, K, V),
    the delta rule's S per value head, float32 (float64 for a float64 model)."""

    conv_state: torch.Tensor | None
    recurrent_state: torch.Tensor


class DeltaRuleMixer(Mixer):
    """What the delta-rule mixers share (the module docstring's layout). Subclasses build
    `o_norm` and any gate or decay parameters, and override `log_decay` and `output_gate`.

    q and k have `n_heads` heads of `head_dim` channels; v, the state and the output have
    `n_value_heads` heads (a multiple of n_heads: Qwen3-Next's grouped value heads, each group
    reading one query-key head) of `value_factor * head_dim` channels.
    """

    state_class: ClassVar[type[MixerState]] = DeltaRuleState
    bounded = True

    def __init__(
        self,
        d_model: int,
        layer_idx: int,
        *,
        n_heads: int | None,
        n_value_heads: int | None,
        head_dim: int | None,
        value_factor: int,
        conv_size: int,
        use_short_conv: bool,
        conv_bias: bool,
        allow_neg_eigval: bool,
        chunk_size: int,
    ):
        super().__init__(d_model, layer_idx)
        name = self.registry_name
        n_heads = n_heads or max(1, d_model // 64)
        n_value_heads = n_value_heads or n_heads
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"{name}: d_model={d_model} is not divisible by "
                                 f"n_heads={n_heads} (or give head_dim)")
            head_dim = d_model // n_heads
        if n_value_heads % n_heads:
            raise ValueError(f"{name}: n_value_heads={n_value_heads} must be a multiple of "
                             f"n_heads={n_heads} (each query-key head serves a group of value "
                             "heads)")
        if use_short_conv and conv_size < 2:
            raise ValueError(f"{name}: conv_size={conv_size} must be >= 2")
        self.n_heads, self.n_value_heads = n_heads, n_value_heads
        self.head_dim, self.value_dim = head_dim, value_factor * head_dim
        self.conv_size = conv_size if use_short_conv else None
        self.allow_neg_eigval, self.chunk_size = allow_neg_eigval, chunk_size
        self.key_channels = n_heads * head_dim
        self.value_channels = n_value_heads * self.value_dim
        self.conv_channels = 2 * self.key_channels + self.value_channels
        self.q_proj = Linear(d_model, self.key_channels, bias=False)
        self.k_proj = Linear(d_model, self.key_channels, bias=False)
        self.v_proj = Linear(d_model, self.value_channels, bias=False)
        self.b_proj = Linear(d_model, n_value_heads, bias=False)
        self.conv1d = None
        if use_short_conv:
            # an nn.Conv1d only so that checkpoints map by name; the op takes weight[:, 0], (D, W)
            channels = self.conv_channels
            self.conv1d = nn.Conv1d(channels, channels, conv_size, groups=channels,
                                    bias=conv_bias, padding=conv_size - 1)
        self.o_proj = Linear(self.value_channels, d_model, bias=False)

    @property
    def groups(self) -> int:
        """Value heads per query-key head."""
        return self.n_value_heads // self.n_heads

    def log_decay(self, x: torch.Tensor) -> torch.Tensor | None:
        """The delta rule's log-decay g <= 0 for x (B, T, d_model): None (no decay), (B, T, H)
        or (B, T, H, K) over the value heads, in the compute dtype."""
        return None

    def output_gate(self, x: torch.Tensor) -> torch.Tensor | None:
        """The output gate's pre-activation (B, T, H, V) for x (B, T, d_model), or None."""
        return None

    def init_state(self, batch_size, device=None, dtype=None):
        device = device or self.q_proj.weight.device
        dtype = dtype or self.q_proj.weight.dtype
        conv_state = None
        if self.conv1d is not None:
            conv_state = torch.zeros(batch_size, self.conv_size - 1, self.conv_channels,
                                     device=device, dtype=dtype)
        recurrent = torch.zeros(batch_size, self.n_value_heads, self.head_dim, self.value_dim,
                                device=device, dtype=compute_dtype(dtype))
        return self.state_class(conv_state, recurrent)

    def state_size(self, seq_len, dtype=torch.float32):
        recurrent = self.n_value_heads * self.head_dim * self.value_dim
        size = recurrent * compute_dtype(dtype).itemsize
        if self.conv1d is not None:
            size += (self.conv_size - 1) * self.conv_channels * dtype.itemsize
        return size

    def forward(self, x, state=None, padding_mask=None):
        self.check_input(x, state)
        # from the projections to the output norm in float32: the delta rule's error term
        # v - S^T k amplifies bf16 roundings of q, k and v (bf16 error 1.9 -> 1.4 U measured)
        dtype = compute_dtype(x.dtype)
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        conv_state = None
        if self.conv1d is not None:
            bias = self.conv1d.bias.to(dtype) if self.conv1d.bias is not None else None
            conv = dict(initial_state=state.conv_state.to(dtype) if state is not None else None,
                        activation="silu")
            if padding_mask is None:
                qkv, conv_state = causal_conv1d(
                    qkv.to(dtype), self.conv1d.weight[:, 0].to(dtype), bias,
                    output_final_state=True, **conv,
                )
            else:
                qkv, conv_state = masked_causal_conv1d(
                    qkv.to(dtype), self.conv1d.weight[:, 0].to(dtype), bias,
                    padding_mask=padding_mask, **conv,
                )
            conv_state = conv_state.detach().to(x.dtype)  # the projections' values: exact
        else:
            qkv = F.silu(qkv.to(dtype))
        q, k, v = qkv.split([self.key_channels, self.key_channels, self.value_channels], dim=-1)
        q = l2_normalize(rearrange(q, "b t (h k) -> b t h k", k=self.head_dim))
        k = l2_normalize(rearrange(k, "b t (h k) -> b t h k", k=self.head_dim))
        v = rearrange(v, "b t (h v) -> b t h v", v=self.value_dim)
        if self.groups > 1:
            # value head h reads query-key head h // groups (Qwen3-Next's repeat_interleave)
            q = q.repeat_interleave(self.groups, dim=2)
            k = k.repeat_interleave(self.groups, dim=2)
        beta = torch.sigmoid(self.b_proj(x).to(dtype))
        if self.allow_neg_eigval:
            # beta in [0, 2]: the transition I - beta k k^T may reflect, which lets the state
            # track parities (Grazzi et al. 2024)
            beta = 2 * beta
        # a padded step writes nothing (beta = 0) and keeps the state undecayed (log-decay 0)
        decay = self.log_decay(x)
        if padding_mask is not None:
            # the convolution checks it only where there is one
            check_padding_mask(x, padding_mask, type(self).__name__)
            beta = fill_padding(beta, padding_mask)
            decay = fill_padding(decay, padding_mask) if decay is not None else None
        o, recurrent = delta_rule(
            q, k, v, beta, decay=decay,
            initial_state=state.recurrent_state if state is not None else None,
            output_final_state=True, chunk_size=self.chunk_size,
        )
        o = rearrange(self.o_norm(o, self.output_gate(x)), "b t h v -> b t (h v)")
        # gradients stop at the carried state (the contract allows it; decoding needs no graph)
        new_state = self.state_class(conv_state, recurrent.detach())
        return fill_padding(self.o_proj(o.to(x.dtype)), padding_mask), new_state


@dataclasses.dataclass
class DeltaNetState(DeltaRuleState):
    """DeltaNet's state: `DeltaRuleState`'s conv window and (B, H, K, V) float32 S."""


@register_mixer("deltanet")
class DeltaNet(DeltaRuleMixer):
    """DeltaNet: the delta rule without decay. x: (B, T, d_model) -> (B, T, d_model).

    Options: n_heads (default d_model / 64), head_dim (default d_model / n_heads), value_factor
    (value channels per key channel), conv_size, use_short_conv (off: q, k, v = silu(proj x)),
    conv_bias, allow_neg_eigval (beta = 2 sigmoid), output_gate (o_norm(o) * silu(g_proj x)),
    norm_eps, chunk_size (the op's chunk).
    """

    state_class = DeltaNetState
    test_variants = [
        {"n_heads": 4, "chunk_size": 8},
        {"n_heads": 2, "use_short_conv": False, "output_gate": True, "allow_neg_eigval": True,
         "value_factor": 2},
        {"n_heads": 4, "head_dim": 8, "conv_size": 2, "conv_bias": True},
    ]

    def __init__(
        self,
        d_model: int,
        layer_idx: int = 0,
        *,
        n_heads: int | None = None,
        head_dim: int | None = None,
        value_factor: int = 1,
        conv_size: int = 4,
        use_short_conv: bool = True,
        conv_bias: bool = False,
        allow_neg_eigval: bool = False,
        output_gate: bool = False,
        norm_eps: float = 1e-5,
        chunk_size: int = 64,
    ):
        super().__init__(
            d_model, layer_idx, n_heads=n_heads, n_value_heads=None, head_dim=head_dim,
            value_factor=value_factor, conv_size=conv_size, use_short_conv=use_short_conv,
            conv_bias=conv_bias, allow_neg_eigval=allow_neg_eigval, chunk_size=chunk_size,
        )
        self.g_proj = Linear(d_model, self.value_channels, bias=False) if output_gate else None
        self.o_norm = HeadRMSNorm(self.value_dim, norm_eps, "silu")

    def output_gate(self, x):
        if self.g_proj is None:
            return None
        return rearrange(self.g_proj(x), "b t (h v) -> b t h v", v=self.value_dim)


__all__ = ["DeltaNet", "DeltaNetState", "DeltaRuleMixer", "DeltaRuleState", "HeadRMSNorm",
           "l2_normalize"]
