"""RWKV-7 ("Goose", RWKV-LM's x070): time mixing (the `rwkv7` mixer) and channel mixing (the
`rwkv7_cmix` FFN).

Time mixing keeps per head a (K, K) state that each token corrects toward its value, a
diagonal-plus-low-rank transition (Peng et al. 2025, "RWKV-7 Goose"). In zoo's (K, V) layout:

    S_t = (Diag(w_t) - (kk_t * a_t) kk_t^T) S_{t-1} + k_t v_t^T,    o_t = S_t^T r_t

which is `zoo.kernels.generalized_delta_rule(r, k, v, a=-kk, b=kk * a, decay=log w, scale=1)`
(RWKV-LM keeps the transpose, a (V, K) state). Around it, per token:
- token shift: x_* = x + (x_prev - x) * mix_* with one static weight per channel for each of
  r, w, k, v, a, g (RWKV-7 drops RWKV-6's data-dependent interpolation);
- decay: log w = -exp(-0.5) * sigmoid(w0 + tanh(x_w W1) W2), in (-0.607, 0). This is the form
  RWKV-LM's current kernels (train_temp's clamp-w CUDA op) and fla compute; it equals x070's
  first soft clamp w = exp(-exp(-softplus(-(w0 + tanh(x_w W1) W2)) - 0.5)), since
  exp(-softplus(-z)) = sigmoid(z), without an exponential of an exponential;
- in-context learning rate a = sigmoid(a0 + x_a A1 A2); removal key kk = k * k_k normalised per
  head; the written key k * (1 + (a - 1) * k_a);
- value residual: every layer after the first mixes in the first layer's values of the same
  tokens, v + (v_first - v) * sigmoid(v0 + x_v V1 V2);
- output: output((ln_x(o) + ((r * k * r_k) summed over the head) v) * sigmoid(x_g G1) G2), with
  ln_x a GroupNorm per head.

The value residual crosses layers: the model passes every mixer that declares
`takes_forward_context` a dict that lives for one forward call; layer 0 leaves its values there
under FIRST_VALUE and later layers read them. It holds only values of the tokens of that call, so
neither the cache nor a one-token decode step carries anything for it.

Parameter names are RWKV-LM's x070 ones (x_r ... r_k, receptance, key, value, output, ln_x), so
its checkpoints map by name. Under bf16 weights everything from the projections to the output
projection runs in float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from zoo.kernels import compute_dtype
from zoo.kernels.delta_rule import generalized_delta_rule

from .base import FFN, Mixer, MixerState, fill_padding
from .linear import Linear
from .registry import register_ffn, register_mixer
from .rwkv4 import ChannelMixState, _channel_ramp, check_ffn_state, shift_tokens

# The forward context's key for layer 0's values (B, T, d_model), in the compute dtype.
FIRST_VALUE = "rwkv7.first_value"
# exp(-0.5): the largest decay rate, so every w_t lies in (exp(-exp(-0.5)), 1) = (0.545, 1)
DECAY_RATE_LIMIT = math.exp(-0.5)


def lora_rank(d_model: int, factor: float) -> int:
    """RWKV-LM's suggested adapter rank: factor * sqrt(d_model), rounded to a multiple of 32,
    at least 32 (x070 uses factor 2.5 for the decay and a, 1.7 for v, 5 for the gate)."""
    return max(32, int(round(factor * d_model**0.5 / 32)) * 32)


@torch.no_grad()
def _orthogonal_(weight: torch.Tensor, gain: float) -> None:
    """x070's orthogonal start for an adapter's second matrix, drawn in float32 (QR has no
    bf16 kernel, and from_pretrained may build the model in bf16)."""
    rows, cols = weight.shape
    gain *= math.sqrt(rows / cols) if rows > cols else 1.0
    drawn = torch.empty(rows, cols, dtype=torch.float32, device=weight.device)
    weight.copy_(nn.init.orthogonal_(drawn, gain=gain))


@dataclasses.dataclass
class Rwkv7State(MixerState):
    """shift: (B, d_model) the last input token; wkv: (B, H, K, K) per-head state in zoo's
    (K, V) layout, float32 (float64 for a float64 model)."""

    shift: torch.Tensor
    wkv: torch.Tensor


@register_mixer("rwkv7")
class Rwkv7TimeMix(Mixer):
    """RWKV-7 time mixing. x: (B, T, d_model) -> (B, T, d_model).

    Layer 0 writes its values into the forward context (`context`, see the module docstring);
    a later layer needs them there and raises a ValueError without them.

    Options:
        head_size: K, channels per head (d_model / head_size heads).
        decay_lora, iclr_lora, value_lora, gate_lora: ranks of the adapters of the decay, the
            in-context learning rate, the value residual and the output gate (default RWKV-LM's
            suggestion, `lora_rank` with factors 2.5, 2.5, 1.7 and 5).
        norm_eps: ln_x's epsilon is head_size * norm_eps (64e-5 at head size 64, as in x070).
        n_layers: depth of the model, used only by the layer-dependent initialisation.
        chunk_size: tokens per chunk of the generalized delta rule's chunked form.
        backend: the generalized_delta_rule backend ("auto", "torch", "reference", and "triton"
            where the op has it).
    """

    state_class = Rwkv7State
    bounded = True
    takes_forward_context: ClassVar[bool] = True
    test_variants = [{"head_size": 16, "decay_lora": 8, "iclr_lora": 8, "value_lora": 8,
                      "gate_lora": 16, "n_layers": 2, "chunk_size": 16}]

    def __init__(
        self,
        d_model: int,
        layer_idx: int = 0,
        *,
        head_size: int = 64,
        decay_lora: int | None = None,
        iclr_lora: int | None = None,
        value_lora: int | None = None,
        gate_lora: int | None = None,
        norm_eps: float = 1e-5,
        n_layers: int = 12,
        chunk_size: int = 64,
        backend: str = "auto",
    ):
        super().__init__(d_model, layer_idx)
        if d_model % head_size:
            raise ValueError(
                f"rwkv7: d_model={d_model} is not divisible by head_size={head_size}"
            )
        C = d_model
        self.head_size, self.n_heads = head_size, d_model // head_size
        self.chunk_size, self.backend = chunk_size, backend
        decay_lora = decay_lora or lora_rank(C, 2.5)
        iclr_lora = iclr_lora or lora_rank(C, 2.5)
        value_lora = value_lora or lora_rank(C, 1.7)
        gate_lora = gate_lora or lora_rank(C, 5)
        self.x_r = nn.Parameter(torch.empty(1, 1, C))
        self.x_w = nn.Parameter(torch.empty(1, 1, C))
        self.x_k = nn.Parameter(torch.empty(1, 1, C))
        self.x_v = nn.Parameter(torch.empty(1, 1, C))
        self.x_a = nn.Parameter(torch.empty(1, 1, C))
        self.x_g = nn.Parameter(torch.empty(1, 1, C))
        self.w0 = nn.Parameter(torch.empty(1, 1, C))
        self.w1 = nn.Parameter(torch.empty(C, decay_lora))
        self.w2 = nn.Parameter(torch.empty(decay_lora, C))
        self.a0 = nn.Parameter(torch.empty(1, 1, C))
        self.a1 = nn.Parameter(torch.empty(C, iclr_lora))
        self.a2 = nn.Parameter(torch.empty(iclr_lora, C))
        if self.mixes_first_value:
            self.v0 = nn.Parameter(torch.empty(1, 1, C))
            self.v1 = nn.Parameter(torch.empty(C, value_lora))
            self.v2 = nn.Parameter(torch.empty(value_lora, C))
        self.g1 = nn.Parameter(torch.empty(C, gate_lora))
        self.g2 = nn.Parameter(torch.empty(gate_lora, C))
        self.k_k = nn.Parameter(torch.empty(1, 1, C))
        self.k_a = nn.Parameter(torch.empty(1, 1, C))
        self.r_k = nn.Parameter(torch.empty(self.n_heads, head_size))
        self.receptance = Linear(C, C, bias=False)
        self.key = Linear(C, C, bias=False)
        self.value = Linear(C, C, bias=False)
        self.output = Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(self.n_heads, C, eps=head_size * norm_eps)
        self._init_parameters(n_layers)

    @property
    def mixes_first_value(self) -> bool:
        """Whether this layer mixes in layer 0's values (every layer but the first)."""
        return self.layer_idx > 0

    @torch.no_grad()
    def _init_parameters(self, n_layers: int) -> None:
        # RWKV-LM's x070 initialisation (train_temp), but for two choices of zoo's RWKV-6: the
        # adapters' first matrices start small and random, not at zero, so that every adapter
        # parameter gets a gradient from the first step; the output projection keeps Linear's
        # default where x070 zeroes it, for the same reason.
        C, N = self.d_model, self.head_size
        depth = self.layer_idx / max(n_layers - 1, 1)  # 0 .. 1
        shallow = 1.0 - self.layer_idx / max(n_layers, 1)  # 1 .. ~0
        ramp = _channel_ramp(C)
        for mix, power in ((self.x_r, 0.2), (self.x_w, 0.9), (self.x_k, 0.7), (self.x_v, 0.7),
                           (self.x_a, 0.9), (self.x_g, 0.2)):
            mix.copy_(1.0 - ramp ** (power * shallow))
        n = torch.arange(C, dtype=torch.float32)
        linear = n / max(C - 1, 1) - 0.5  # -0.5 .. 0.5 across the channels
        centre = (N - 1) / 2
        # -1 .. 1 within each head, squared with its sign
        zigzag = ((n % N) - centre) / centre if N > 1 else torch.zeros_like(n)
        zigzag = zigzag * zigzag.abs()
        decay_base = -6 + 6 * (n / max(C - 1, 1)) ** (1 + depth**0.3)
        self.w0.copy_((decay_base + 0.5 + 2.5 * zigzag).view(1, 1, C))
        self.a0.copy_((-0.19 + 0.3 * zigzag + 0.4 * linear).view(1, 1, C))
        self.k_k.copy_((0.71 - 0.1 * linear).view(1, 1, C))
        self.k_a.fill_(1.02)
        self.r_k.fill_(-0.04)
        firsts, seconds = [self.w1, self.a1, self.g1], [self.w2, self.a2, self.g2]
        if self.mixes_first_value:
            self.v0.copy_((0.73 - 0.4 * linear).view(1, 1, C))
            firsts.append(self.v1)
            seconds.append(self.v2)
        for first in firsts:
            first.uniform_(-1e-2, 1e-2)
        for second in seconds:
            _orthogonal_(second, 0.1)
        bound = C**-0.5
        self.receptance.weight.uniform_(-0.5 * bound, 0.5 * bound)
        self.key.weight.uniform_(-0.05 * bound, 0.05 * bound)
        self.value.weight.uniform_(-0.5 * bound, 0.5 * bound)

    def init_state(self, batch_size, device=None, dtype=None):
        device = device or self.key.weight.device
        dtype = dtype or self.key.weight.dtype
        K = self.head_size
        return Rwkv7State(
            torch.zeros(batch_size, self.d_model, device=device, dtype=dtype),
            torch.zeros(batch_size, self.n_heads, K, K, device=device,
                        dtype=compute_dtype(dtype)),
        )

    def state_size(self, seq_len, dtype=torch.float32):
        wkv = self.n_heads * self.head_size**2 * compute_dtype(dtype).itemsize
        return self.d_model * dtype.itemsize + wkv

    def forward(
        self,
        x: torch.Tensor,
        state: Rwkv7State | None = None,
        padding_mask: torch.Tensor | None = None,
        *,
        context: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, Rwkv7State]:
        """x (B, T, d_model) and the state before it -> (y, the state after x's last real
        token). `context` is the model's per-forward dict (module docstring): layer 0 writes
        FIRST_VALUE there, later layers read it; padding_mask (B, T) True at real tokens, or
        None (layers/base.py), the same for every layer of one call."""
        self.check_input(x, state)
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        dtype = compute_dtype(x.dtype)
        shifted, shift = shift_tokens(x, state.shift, padding_mask)
        delta = shifted - x
        xr, xw, xk, xv, xa, xg = (x + delta * mix for mix in (
            self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))
        r = self.receptance(xr).to(dtype)
        k = self.key(xk).to(dtype)
        v = self._value_residual(self.value(xv).to(dtype), xv, context)
        w = self.w0.to(dtype) + (torch.tanh(xw @ self.w1) @ self.w2).to(dtype)
        log_decay = -DECAY_RATE_LIMIT * torch.sigmoid(w)
        iclr = torch.sigmoid(self.a0.to(dtype) + (xa @ self.a1 @ self.a2).to(dtype))
        gate = (torch.sigmoid(xg @ self.g1) @ self.g2).to(dtype)

        heads = dict(d=self.head_size)
        removal = F.normalize(rearrange(k * self.k_k.to(dtype), "b t (h d) -> b t h d", **heads),
                              p=2.0, dim=-1)
        k = k * (1 + (iclr - 1) * self.k_a.to(dtype))
        r, k, v, iclr, log_decay = (rearrange(t, "b t (h d) -> b t h d", **heads)
                                    for t in (r, k, v, iclr, log_decay))
        # a padded step is the identity on the state: decay 1 (log 0), nothing removed (the
        # low-rank term's b = 0) and no key written
        written, removed = fill_padding(k, padding_mask), fill_padding(removal * iclr, padding_mask)
        o, wkv = generalized_delta_rule(
            r, written, v, -removal, removed, decay=fill_padding(log_decay, padding_mask),
            scale=1.0,
            initial_state=state.wkv, output_final_state=True, chunk_size=self.chunk_size,
            backend=self.backend,
        )
        o = F.group_norm(rearrange(o, "b t h d -> (b t) (h d)"), self.n_heads,
                         self.ln_x.weight.to(dtype), self.ln_x.bias.to(dtype), self.ln_x.eps)
        # the bonus: the current token's own value, weighted by how r meets k in each head
        bonus = (r * k * self.r_k.to(dtype)).sum(-1, keepdim=True) * v
        o = o.view(x.shape) + rearrange(bonus, "b t h d -> b t (h d)")
        # the carried state leaves the autograd graph, as attention's KV cache does
        new_state = Rwkv7State(shift, wkv.detach())
        return fill_padding(self.output((o * gate).to(x.dtype)), padding_mask), new_state

    def _value_residual(self, v: torch.Tensor, xv: torch.Tensor,
                        context: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """Layer 0: v, left in `context` for the later layers. Later layers: v moved toward
        layer 0's values of the same tokens by a per-channel sigmoid gate."""
        if not self.mixes_first_value:
            if context is not None:
                context[FIRST_VALUE] = v
            return v
        first = context.get(FIRST_VALUE) if context is not None else None
        if first is None:
            raise ValueError(
                f"rwkv7 (layer {self.layer_idx}): no first-layer values to mix in; RWKV-7's "
                f"value residual needs an rwkv7 layer 0 run in the same forward, or "
                f"context={{{FIRST_VALUE!r}: v}} with v (B, T, d_model)"
            )
        if first.shape != v.shape:
            raise ValueError(
                f"rwkv7 (layer {self.layer_idx}): context[{FIRST_VALUE!r}] has shape "
                f"{tuple(first.shape)}, but this input's values are {tuple(v.shape)}"
            )
        mix = torch.sigmoid(self.v0.to(v.dtype) + (xv @ self.v1 @ self.v2).to(v.dtype))
        return v + (first.to(v.dtype) - v) * mix


@register_ffn("rwkv7_cmix")
class Rwkv7ChannelMix(FFN):
    """RWKV-7 channel mixing: value(relu(key(x + (x_prev - x) * x_k))^2), RWKV-6's without its
    receptance gate. hidden_size defaults to x070's 4 * d_model. x: (B, T, d_model) -> same."""

    state_class = ChannelMixState

    def __init__(self, d_model: int, *, hidden_size: int | None = None):
        super().__init__(d_model)
        hidden_size = hidden_size or 4 * d_model
        self.x_k = nn.Parameter(torch.empty(1, 1, d_model))
        self.key = Linear(d_model, hidden_size, bias=False)
        self.value = Linear(hidden_size, d_model, bias=False)
        with torch.no_grad():
            # x070's 1 - ramp ** (shallow ** 4) at mid depth (shallow = 0.5): an FFN is built
            # without knowing its layer
            self.x_k.copy_(1.0 - _channel_ramp(d_model) ** (0.5**4))
            bound = d_model**-0.5
            self.key.weight.uniform_(-0.5 * bound, 0.5 * bound)

    def init_state(self, batch_size, device=None, dtype=None):
        return ChannelMixState(torch.zeros(
            batch_size, self.d_model, device=device or self.key.weight.device,
            dtype=dtype or self.key.weight.dtype,
        ))

    def state_size(self, seq_len, dtype=torch.float32):
        return self.d_model * dtype.itemsize

    def forward(self, x, state=None, padding_mask=None):
        check_ffn_state(self, x, state)
        shifted, shift = shift_tokens(x, state.shift if state is not None else None,
                                      padding_mask)
        k = torch.relu(self.key(x + (shifted - x) * self.x_k)).square()
        return fill_padding(self.value(k), padding_mask), ChannelMixState(shift)


__all__ = ["FIRST_VALUE", "Rwkv7ChannelMix", "Rwkv7State", "Rwkv7TimeMix", "lora_rank"]
