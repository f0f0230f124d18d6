"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks"), in Qwen3-Next's
layout: DeltaNet (`deltanet.py`) with a decay of the whole state per step and head, an output
gate, and grouped value heads,

    g = -exp(A_log) * softplus(a_proj x + dt_bias)          (B, T, H) log-decay, Mamba-2's gate
    S_t = (I - beta_t k_t k_t^T) exp(g_t) S_{t-1} + beta_t k_t v_t^T
    y = o_proj(weight * rms_norm(o) * silu(g_proj x))      the gated RMSNorm, per value head

q and k have n_heads heads, v and S n_value_heads (Qwen3-Next: 16 and 32). A_log, dt_bias,
beta and the gate belong to the value heads. Parameter names follow fla's GatedDeltaNet
(q/k/v/a/b/g/o_proj, A_log, dt_bias, o_norm); Qwen3-Next packs q, k, v, z (= g_proj) into
in_proj_qkvz and b, a into in_proj_ba, per key-head group, and names the norm and output
projection norm and out_proj.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from zoo.kernels import compute_dtype

from .deltanet import DeltaRuleMixer, DeltaRuleState, HeadRMSNorm
from .linear import Linear
from .mamba import init_dt_bias
from .registry import register_mixer

# Mamba-2's initialisation of the gate: softplus(dt_bias) log-uniform in [DT_MIN, DT_MAX] and
# A uniform in A_INIT_RANGE, so the heads start with per-step decays exp(g) from 0.999 to 0.2
DT_MIN, DT_MAX, DT_INIT_FLOOR = 0.001, 0.1, 1e-4
A_INIT_RANGE = (1.0, 16.0)


def init_A_log(n: int, low: float = A_INIT_RANGE[0], high: float = A_INIT_RANGE[1]) -> nn.Parameter:
    """log A with A uniform in [low, high], (n,) float32: the decay rate is exp(A_log)."""
    return nn.Parameter(torch.empty(n, dtype=torch.float32).uniform_(low, high).log())


@dataclasses.dataclass
class GatedDeltaNetState(DeltaRuleState):
    """Gated DeltaNet's state: `DeltaRuleState`'s conv window and (B, H, K, V) float32 S."""


@register_mixer("gated_deltanet")
class GatedDeltaNet(DeltaRuleMixer):
    """Gated DeltaNet. x: (B, T, d_model) -> (B, T, d_model).

    Options: n_heads (query-key heads, default d_model / 64), n_value_heads (a multiple of
    n_heads; default n_heads), head_dim (default d_model / n_heads), value_factor (value
    channels per key channel), conv_size, use_short_conv, conv_bias, allow_neg_eigval,
    output_gate (off: o_norm without a gate), norm_eps, chunk_size.
    """

    state_class = GatedDeltaNetState
    test_variants = [
        {"n_heads": 2, "n_value_heads": 4, "head_dim": 16, "chunk_size": 8},
        {"n_heads": 4, "use_short_conv": False, "output_gate": False, "value_factor": 2},
        {"n_heads": 4, "allow_neg_eigval": True, "conv_size": 3, "conv_bias": True},
    ]

    def __init__(
        self,
        d_model: int,
        layer_idx: int = 0,
        *,
        n_heads: int | None = None,
        n_value_heads: int | None = None,
        head_dim: int | None = None,
        value_factor: int = 1,
        conv_size: int = 4,
        use_short_conv: bool = True,
        conv_bias: bool = False,
        allow_neg_eigval: bool = False,
        output_gate: bool = True,
        norm_eps: float = 1e-5,
        chunk_size: int = 64,
    ):
        super().__init__(
            d_model, layer_idx, n_heads=n_heads, n_value_heads=n_value_heads,
            head_dim=head_dim, value_factor=value_factor, conv_size=conv_size,
            use_short_conv=use_short_conv, conv_bias=conv_bias,
            allow_neg_eigval=allow_neg_eigval, chunk_size=chunk_size,
        )
        self.a_proj = Linear(d_model, self.n_value_heads, bias=False)
        self.A_log = init_A_log(self.n_value_heads)
        self.dt_bias = nn.Parameter(torch.empty(self.n_value_heads))
        init_dt_bias(self.dt_bias, DT_MIN, DT_MAX, DT_INIT_FLOOR)
        self.g_proj = Linear(d_model, self.value_channels, bias=False) if output_gate else None
        self.o_norm = HeadRMSNorm(self.value_dim, norm_eps, "silu")

    def log_decay(self, x):
        dtype = compute_dtype(x.dtype)
        rate = torch.exp(self.A_log.to(dtype))
        return -rate * F.softplus(self.a_proj(x).to(dtype) + self.dt_bias.to(dtype))

    def output_gate(self, x):
        if self.g_proj is None:
            return None
        return rearrange(self.g_proj(x), "b t (h v) -> b t h v", v=self.value_dim)


__all__ = ["GatedDeltaNet", "GatedDeltaNetState", "init_A_log"]
