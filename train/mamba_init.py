"""Mamba-2 students initialised from the teacher's attention, after Mamba-in-Llama (Wang et al.
2024, "The Mamba in the Llama"): Mamba-2's SSD is linear attention with q = C, k = B, v = x (and
a decay), so the attention's projections fill Mamba-2's and the block starts as the teacher's
attention with silu features in place of the softmax, a decay, and a per-head norm.

For a teacher layer with H query heads and H_kv KV heads of head_dim d (d_inner = H * d):

    Mamba-2 shape   expand * d_model = H * d, head_dim = d, d_state = d, n_groups = H, bias
    in_proj rows    [0, Hd)          z     weight 0, bias GATE_BIAS (a constant gate)
                    [Hd, 2Hd)        x  <- v_proj, each KV head's d rows once per query head
                    [2Hd, 3Hd)       B  <- k_proj, repeated the same way
                    [3Hd, 4Hd)       C  <- q_proj
                    [4Hd, 4Hd + H)   dt    weight nn.Linear's default, bias 0
    out_proj     <- o_proj           (d_model, Hd), as it is

n_groups is H, not H_kv: Mamba-2 shares a group's C among the group's heads while every query
head has its own q, so C needs one group per query head, and B then holds k repeated as
grouped-query attention repeats it (Mamba-in-Llama repeats its x and B the same way). The repeat
costs in_proj rows and conv channels, not state: the SSM state is H * d_state * head_dim whatever
n_groups is. in_proj's bias rows for x, B and C hold the teacher's v/k/q biases (0 where it has
none); out_proj's bias is o_proj's (0 where it has none).

The rest is fresh. As Mamba2 initialises them: softplus(dt_bias) log-uniform in [dt_min,
dt_max], A_log = log U(A_init_range), D = 1. Chosen for the mapping:

- conv1d the identity (last tap 1, earlier taps and bias 0), so the copied projections reach the
  SSD as they are, up to Mamba-2's silu;
- z's weight rows 0 and its bias GATE_BIAS, so the gate silu(z) is one constant that the
  per-head norm divides out: nn.Linear's random z rows would gate every channel by a random
  signed factor and scramble the copied heads. Without an in_proj bias (the caller's
  bias=False) the gate starts at silu(0) = 0 and the block outputs 0 until z learns;
- the gated norm's weight NORM_WEIGHT, near attention's output scale per channel: the norm
  leaves every head at RMS 1, several times what attention's averages of v reach.

With z and the norm left as Mamba2 initialises them, the mapped block started further from the
teacher attention's output than a zero output does, and stayed behind a wholly fresh Mamba-2
through attention transfer. The teacher's rotary positions have no counterpart; the
convolution and the decay carry order instead.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch

from zoo.layers import build_mixer
from zoo.layers.attention import Attention
from zoo.layers.mamba2 import Mamba2

# z's bias: any positive constant passes every channel alike (the norm divides it out); at 1,
# silu'(1) = 0.93 lets z's weights learn at full rate.
GATE_BIAS = 1.0
# The gated norm's weight: attention's output before o_proj sits well below RMS 1 per channel,
# so the normed heads start scaled down; stage 1 trains it from there.
NORM_WEIGHT = 0.1


@dataclasses.dataclass
class MappedTensor:
    """A student mixer tensor filled from teacher mixer tensors of other names (local names)."""

    sources: list[str]  # the teacher mixer's tensors it was filled from, e.g. ["o_proj.weight"]
    whole: bool  # False: only some of its rows came from the teacher, the others are fresh


def attention_layout(attention_spec: Mapping[str, Any], d_model: int) -> Attention:
    """The teacher layer's attention built on the meta device: its head layout and biases after
    Attention's own defaults, with no memory spent on weights."""
    with torch.device("meta"):
        return build_mixer(dict(attention_spec), d_model)


def mamba2_spec_from_attention(spec: Mapping[str, Any], attention_spec: Mapping[str, Any],
                               d_model: int) -> dict[str, Any]:
    """The mamba2 spec with expand, head_dim, d_state, n_groups and bias derived from the
    teacher's attention wherever the caller left them out.

    Raises ValueError naming an option the caller set to a value the mapping cannot use, with
    the value it needs: fresh initialisation in its place would leave a "Mamba-in-Llama" student
    that is not one, so linearize refuses rather than falling back.
    """
    attention = attention_layout(attention_spec, d_model)
    n_heads, head_dim = attention.n_heads, attention.head_dim
    d_inner = n_heads * head_dim
    expand: int | float = d_inner // d_model
    if d_inner % d_model:
        # Mamba2 takes d_inner = int(expand * d_model): nudge a quotient that rounds below
        expand = d_inner / d_model
        if int(expand * d_model) < d_inner:
            expand = math.nextafter(expand, math.inf)
    layout = (f"the teacher's attention has n_heads={n_heads}, "
              f"n_kv_heads={attention.n_kv_heads}, head_dim={head_dim}")
    needs = {
        "head_dim": (head_dim, "x holds each head's v, so Mamba-2's head_dim is the attention's"),
        "d_state": (head_dim, "B and C hold each head's k and q, so d_state is the attention's "
                              "head_dim"),
        "n_groups": (n_heads, "every query head has its own q and Mamba-2 shares C within a "
                              "group, so there is one group per query head (n_heads)"),
    }
    out = dict(spec)
    for option, (value, why) in needs.items():
        if option in out and out[option] != value:
            raise ValueError(
                f"linearize: mixer.{option}={out[option]!r} does not fit the mapping from "
                f"attention ({layout}): {why}; allowed: {option}={value}, or leave it out")
        out.setdefault(option, value)
    given = out.get("expand")
    if given is not None and (not isinstance(given, (int, float)) or isinstance(given, bool)
                              or int(given * d_model) != d_inner):
        raise ValueError(
            f"linearize: mixer.expand={given!r} does not fit the mapping from attention "
            f"({layout}): d_inner = int(expand * d_model) must be n_heads * head_dim = "
            f"{d_inner}; allowed: expand={expand}, or leave it out")
    out.setdefault("expand", expand)
    has_bias = attention.q_proj.bias is not None or attention.o_proj.bias is not None
    if has_bias and out.get("bias") is False:
        raise ValueError(
            "linearize: mixer.bias=False would drop the teacher's attention biases (qkv_bias or "
            "out_bias); allowed: bias=True, or leave it out")
    # in_proj's bias holds z's constant gate (and the teacher's biases where it has them)
    out.setdefault("bias", True)
    return out


def _per_query_head(rows: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """(n_kv_heads * head_dim, ...) -> (n_heads * head_dim, ...): each KV head's rows once for
    every query head that reads it, in grouped-query attention's order (query head h reads KV
    head h // (n_heads / n_kv_heads))."""
    n_kv_heads = rows.shape[0] // head_dim
    grouped = rows.unflatten(0, (n_kv_heads, head_dim))
    return grouped.repeat_interleave(n_heads // n_kv_heads, dim=0).flatten(0, 1)


@torch.no_grad()
def mamba2_from_attention(attention: Attention, mamba: Mamba2) -> dict[str, MappedTensor]:
    """Fill `mamba` from the teacher layer's `attention` in place (q -> C, k -> B, v -> x,
    o -> out_proj; conv1d, z and the norm set as the module docstring says) and return what came
    from where, by local name.

    Raises ValueError when mamba's shape is not the one `mamba2_spec_from_attention` derives.
    """
    n_heads, head_dim = attention.n_heads, attention.head_dim
    d_inner = n_heads * head_dim
    have = {"d_inner": mamba.d_inner, "head_dim": mamba.head_dim, "d_state": mamba.d_state,
            "n_groups": mamba.n_groups}
    want = {"d_inner": d_inner, "head_dim": head_dim, "d_state": head_dim, "n_groups": n_heads}
    if have != want:
        raise ValueError(f"linearize: a mamba2 mixer with {have} cannot take the attention's "
                         f"q/k/v/o; the mapping needs {want}")
    teacher_bias = attention.q_proj.bias is not None or attention.o_proj.bias is not None
    if mamba.in_proj.bias is None and teacher_bias:
        raise ValueError("linearize: mixer.bias=False would drop the teacher's attention biases "
                         "(qkv_bias or out_bias); allowed: bias=True")
    # in_proj's rows: z, then x, B, C (the convolution's channels), then dt
    z_rows = slice(0, d_inner)
    fills = ((slice(d_inner, 2 * d_inner), attention.v_proj, True),
             (slice(2 * d_inner, 3 * d_inner), attention.k_proj, True),
             (slice(3 * d_inner, 4 * d_inner), attention.q_proj, False))
    for rows, projection, repeat in fills:
        for part in ("weight", "bias"):
            target = getattr(mamba.in_proj, part)
            if target is None:
                continue
            source = getattr(projection, part)
            if source is None:  # a bias-free teacher: its bias is zero
                target[rows] = 0
                continue
            if repeat:
                source = _per_query_head(source, n_heads, head_dim)
            target[rows] = source.to(target.dtype)
    mamba.in_proj.weight[z_rows] = 0
    if mamba.in_proj.bias is not None:
        mamba.in_proj.bias[z_rows] = GATE_BIAS
        mamba.in_proj.bias[4 * d_inner:] = 0  # dt's offset is dt_bias's alone
    mamba.out_proj.weight.copy_(attention.o_proj.weight.to(mamba.out_proj.weight.dtype))
    if mamba.out_proj.bias is not None:
        if attention.o_proj.bias is None:
            mamba.out_proj.bias.zero_()
        else:
            mamba.out_proj.bias.copy_(attention.o_proj.bias.to(mamba.out_proj.bias.dtype))
    # The identity on the last tap (the current token) passes x, B and C through unchanged.
    mamba.conv1d.weight.zero_()
    mamba.conv1d.weight[:, 0, -1] = 1
    if mamba.conv1d.bias is not None:
        mamba.conv1d.bias.zero_()
    mamba.norm.weight.fill_(NORM_WEIGHT)

    mapped = {
        "in_proj.weight": MappedTensor(["q_proj.weight", "k_proj.weight", "v_proj.weight"],
                                       whole=False),
        "out_proj.weight": MappedTensor(["o_proj.weight"], whole=True),
    }
    if mamba.in_proj.bias is not None and attention.q_proj.bias is not None:
        mapped["in_proj.bias"] = MappedTensor(["q_proj.bias", "k_proj.bias", "v_proj.bias"],
                                              whole=False)
    if mamba.out_proj.bias is not None and attention.o_proj.bias is not None:
        mapped["out_proj.bias"] = MappedTensor(["o_proj.bias"], whole=True)
    return mapped


__all__ = ["GATE_BIAS", "NORM_WEIGHT", "MappedTensor", "attention_layout",
           "mamba2_from_attention", "mamba2_spec_from_attention"]
