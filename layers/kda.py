"""Kimi Delta Attention (KDA; Kimi Team 2025, "Kimi Linear"): Gated DeltaNet
(`gated_deltanet.py`) whose decay has one rate per key channel instead of one per head,

    g = -exp(A_log) * softplus(f_b_proj(f_a_proj x) + dt_bias)   (B, T, H, K) log-decay
    S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T
    y = o_proj(weight * rms_norm(o) * sigmoid(g_b_proj(g_a_proj x)))

with the decay and the output gate each from a low-rank projection (rank `decay_lora`,
`gate_lora`; Kimi Linear: head_dim), A_log one rate per head and dt_bias one bias per channel.
Names follow transformers' KimiLinearDeltaAttention (q/k/v_proj, conv1d over [q | k | v],
b_proj, g_a_proj, g_b_proj, o_norm, o_proj), whose f_a_proj, f_b_proj, dt_bias and A_log sit
in a `forget_gate` submodule (A_log shaped (1, 1, H, 1)). dt_bias starts as Gated DeltaNet's
(Mamba-2's initialisation), where Kimi Linear and fla start it at zero.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from zoo.kernels import compute_dtype

from .deltanet import DeltaRuleMixer, DeltaRuleState, HeadRMSNorm
from .gated_deltanet import DT_INIT_FLOOR, DT_MAX, DT_MIN, init_A_log
from .linear import Linear
from .mamba import init_dt_bias
from .registry import register_mixer


@dataclasses.dataclass
class KimiDeltaAttentionState(DeltaRuleState):
    """KDA's state: `DeltaRuleState`'s conv window and (B, H, K, V) float32 S."""


@register_mixer("kda")
class KimiDeltaAttention(DeltaRuleMixer):
    """Kimi Delta Attention. x: (B, T, d_model) -> (B, T, d_model).

    Options: n_heads (default d_model / 64), head_dim (default d_model / n_heads),
    value_factor (value channels per key channel; Kimi Linear: 1), decay_lora and gate_lora
    (the low-rank projections' ranks, default head_dim), conv_size, use_short_conv, conv_bias,
    allow_neg_eigval, norm_eps, chunk_size.
    """

    state_class = KimiDeltaAttentionState
    test_variants = [
        {"n_heads": 4, "decay_lora": 8, "gate_lora": 8, "chunk_size": 8},
        {"n_heads": 2, "use_short_conv": False, "value_factor": 2, "allow_neg_eigval": True},
        {"n_heads": 4, "head_dim": 8, "conv_size": 3, "conv_bias": True},
    ]

    def __init__(
        self,
        d_model: int,
        layer_idx: int = 0,
        *,
        n_heads: int | None = None,
        head_dim: int | None = None,
        value_factor: int = 1,
        decay_lora: int | None = None,
        gate_lora: int | None = None,
        conv_size: int = 4,
        use_short_conv: bool = True,
        conv_bias: bool = False,
        allow_neg_eigval: bool = False,
        norm_eps: float = 1e-5,
        chunk_size: int = 64,
    ):
        super().__init__(
            d_model, layer_idx, n_heads=n_heads, n_value_heads=None, head_dim=head_dim,
            value_factor=value_factor, conv_size=conv_size, use_short_conv=use_short_conv,
            conv_bias=conv_bias, allow_neg_eigval=allow_neg_eigval, chunk_size=chunk_size,
        )
        decay_lora = decay_lora or self.head_dim
        gate_lora = gate_lora or self.head_dim
        self.f_a_proj = Linear(d_model, decay_lora, bias=False)
        self.f_b_proj = Linear(decay_lora, self.key_channels, bias=False)
        self.A_log = init_A_log(self.n_heads)
        self.dt_bias = nn.Parameter(torch.empty(self.key_channels))
        init_dt_bias(self.dt_bias, DT_MIN, DT_MAX, DT_INIT_FLOOR)
        self.g_a_proj = Linear(d_model, gate_lora, bias=False)
        self.g_b_proj = Linear(gate_lora, self.value_channels, bias=False)
        self.o_norm = HeadRMSNorm(self.value_dim, norm_eps, "sigmoid")

    def log_decay(self, x):
        dtype = compute_dtype(x.dtype)
        f = self.f_b_proj(self.f_a_proj(x)).to(dtype) + self.dt_bias.to(dtype)
        f = rearrange(f, "b t (h k) -> b t h k", k=self.head_dim)
        return -torch.exp(self.A_log.to(dtype))[:, None] * F.softplus(f)

    def output_gate(self, x):
        return rearrange(self.g_b_proj(self.g_a_proj(x)), "b t (h v) -> b t h v",
                         v=self.value_dim)


__all__ = ["KimiDeltaAttention", "KimiDeltaAttentionState"]
