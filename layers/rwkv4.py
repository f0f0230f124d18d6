"""RWKV-4: time mixing (the `rwkv4` mixer, built on the `wkv4` op) and channel mixing (the
`rwkv4_cmix` FFN). Parameters carry transformers' `RwkvSelfAttention` / `RwkvFeedForward` names
and shapes, so a Hugging Face RWKV-4 checkpoint maps onto them by name.

Both layers mix each token with the one before it ("token shift"); the previous token is part of
the state, so a sequence split anywhere, or fed one token at a time, gives the same output.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from zoo.kernels import wkv4
from zoo.kernels.wkv4 import empty_wkv4_state, state_dtype

from .base import FFN, Mixer, MixerState
from .linear import Linear
from .registry import register_ffn, register_mixer


def token_shift(x: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
    """x shifted one step back in time: (B, T, C) -> (B, T, C), row 0 is `last` (B, C) or 0."""
    first = x.new_zeros(x.shape[0], 1, x.shape[2]) if last is None else last[:, None].to(x.dtype)
    return torch.cat([first, x[:, :-1]], dim=1)


def last_token(x: torch.Tensor) -> torch.Tensor:
    """x[:, -1] (B, C) in storage of its own, detached: a view would keep the whole (B, T, C)
    input of a prefill alive for as long as the state lives (2 MB at 8k tokens here)."""
    return x[:, -1].detach().clone(memory_format=torch.contiguous_format)


def check_ffn_state(ffn: FFN, x: torch.Tensor, state: MixerState | None) -> None:
    """The checks `Mixer.check_input` makes, for an FFN that carries a state."""
    name = type(ffn).__name__
    if x.dim() != 3 or x.shape[-1] != ffn.d_model:
        raise ValueError(f"{name}: x must be (B, T, d_model={ffn.d_model}), got {tuple(x.shape)}")
    if state is None:
        return
    if not isinstance(state, ffn.state_class):
        raise TypeError(
            f"{name} needs a {ffn.state_class.__name__}, got a {type(state).__name__}: "
            "a state from another layer"
        )
    if state.batch_size != x.shape[0]:
        raise ValueError(
            f"{name}: state batch size {state.batch_size} != input batch size {x.shape[0]}"
        )


def _channel_ramp(d_model: int) -> torch.Tensor:
    """i / d_model for each channel, shaped (1, 1, d_model) like the time_mix parameters."""
    return (torch.arange(d_model, dtype=torch.float32) / d_model)[None, None]


@dataclasses.dataclass
class Rwkv4State(MixerState):
    """shift: (B, d_model) the last input token; wkv: (B, 3, C) rows (num, den, max), float32."""

    shift: torch.Tensor
    wkv: torch.Tensor


@register_mixer("rwkv4")
class Rwkv4TimeMix(Mixer):
    """RWKV-4 time mixing. x: (B, T, d_model) -> (B, T, d_model).

    k, v, r come from linear maps of x interpolated with the previous token (time_mix_*);
    out = output(sigmoid(r) * wkv4(time_decay, time_first, k, v)).

    Options:
        attention_hidden_size: C, the width of k, v, r (default d_model).
        n_layers: depth of the model, used only by the layer-dependent initialisation.
        backend: the wkv4 backend ("auto", "torch", "triton", "reference").
    """

    state_class = Rwkv4State
    bounded = True
    test_variants = [{"attention_hidden_size": 32, "n_layers": 2}, {"backend": "triton"}]

    def __init__(
        self,
        d_model: int,
        layer_idx: int = 0,
        *,
        attention_hidden_size: int | None = None,
        n_layers: int = 12,
        backend: str = "auto",
    ):
        super().__init__(d_model, layer_idx)
        C = attention_hidden_size or d_model
        self.attention_hidden_size = C
        self.backend = backend
        self.time_decay = nn.Parameter(torch.empty(C))
        self.time_first = nn.Parameter(torch.empty(C))
        self.time_mix_key = nn.Parameter(torch.empty(1, 1, d_model))
        self.time_mix_value = nn.Parameter(torch.empty(1, 1, d_model))
        self.time_mix_receptance = nn.Parameter(torch.empty(1, 1, d_model))
        self.key = Linear(d_model, C, bias=False)
        self.value = Linear(d_model, C, bias=False)
        self.receptance = Linear(d_model, C, bias=False)
        self.output = Linear(C, d_model, bias=False)
        self._init_time_parameters(n_layers)

    @torch.no_grad()
    def _init_time_parameters(self, n_layers: int) -> None:
        # RWKV-LM's RWKV-4 initialisation: decays spread from slow to fast across channels,
        # faster in deeper layers; mixing weights that lean on the previous token more in
        # deeper layers.
        C = self.attention_hidden_size
        depth = self.layer_idx / max(n_layers - 1, 1)  # 0 .. 1
        shallow = 1.0 - self.layer_idx / max(n_layers, 1)  # 1 .. ~0
        h = torch.arange(C, dtype=torch.float32) / max(C - 1, 1)
        self.time_decay.copy_(-5 + 8 * h ** (0.7 + 1.3 * depth))
        zigzag = 0.5 * (((torch.arange(C) + 1) % 3) - 1).float()
        self.time_first.copy_(math.log(0.3) + zigzag)
        ramp = _channel_ramp(self.d_model)
        self.time_mix_key.copy_(ramp**shallow)
        self.time_mix_value.copy_(ramp**shallow + 0.3 * depth)
        self.time_mix_receptance.copy_(ramp ** (0.5 * shallow))

    def init_state(self, batch_size, device=None, dtype=None):
        device = device or self.key.weight.device
        dtype = dtype or self.key.weight.dtype
        return Rwkv4State(
            torch.zeros(batch_size, self.d_model, device=device, dtype=dtype),
            empty_wkv4_state(batch_size, self.attention_hidden_size, device, state_dtype(dtype)),
        )

    def state_size(self, seq_len, dtype=torch.float32):
        element = torch.empty((), dtype=dtype).element_size()
        wkv_element = torch.empty((), dtype=state_dtype(dtype)).element_size()
        return self.d_model * element + 3 * self.attention_hidden_size * wkv_element

    def forward(self, x, state=None):
        self.check_input(x, state)
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        shifted = token_shift(x, state.shift)
        xk = x * self.time_mix_key + shifted * (1 - self.time_mix_key)
        xv = x * self.time_mix_value + shifted * (1 - self.time_mix_value)
        xr = x * self.time_mix_receptance + shifted * (1 - self.time_mix_receptance)
        k, v = self.key(xk), self.value(xv)
        r = torch.sigmoid(self.receptance(xr))
        y, wkv = wkv4(self.time_decay, self.time_first, k, v, initial_state=state.wkv,
                      output_final_state=True, backend=self.backend)
        # the carried state leaves the autograd graph, as attention's KV cache does
        new_state = Rwkv4State(last_token(x), wkv.detach())
        return self.output(r * y), new_state


@dataclasses.dataclass
class ChannelMixState(MixerState):
    """shift: (B, d_model) the last input token of a channel-mixing FFN."""

    shift: torch.Tensor


class RwkvChannelMix(FFN):
    """RWKV channel mixing, the one body of RWKV-4's and RWKV-6's. x: (B, T, d_model) -> same.

    out = sigmoid(receptance(xr)) * value(relu(key(xk))^2), where xk and xr interpolate each
    token with the one before it. The versions differ only in their interpolation weights
    (names and which side they weigh, kept so each version's checkpoints load by name) and in
    hidden_size's default: a subclass holds those and `interpolate`.
    """

    state_class = ChannelMixState

    def __init__(self, d_model: int, hidden_size: int):
        super().__init__(d_model)
        self.key = Linear(d_model, hidden_size, bias=False)
        self.receptance = Linear(d_model, d_model, bias=False)
        self.value = Linear(hidden_size, d_model, bias=False)

    def interpolate(
        self, x: torch.Tensor, shifted: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(xk, xr): the inputs of key and receptance, from x and the previous tokens."""
        raise NotImplementedError

    def init_state(self, batch_size, device=None, dtype=None):
        return ChannelMixState(torch.zeros(
            batch_size, self.d_model, device=device or self.key.weight.device,
            dtype=dtype or self.key.weight.dtype,
        ))

    def state_size(self, seq_len, dtype=torch.float32):
        return self.d_model * torch.empty((), dtype=dtype).element_size()

    def forward(self, x, state=None):
        check_ffn_state(self, x, state)
        xk, xr = self.interpolate(x, token_shift(x, state.shift if state is not None else None))
        k = torch.relu(self.key(xk)).square()
        out = torch.sigmoid(self.receptance(xr)) * self.value(k)
        return out, ChannelMixState(last_token(x))


@register_ffn("rwkv4_cmix")
class Rwkv4ChannelMix(RwkvChannelMix):
    """RWKV-4 channel mixing: x * time_mix_* + prev * (1 - time_mix_*), as transformers'
    `RwkvFeedForward` names it. hidden_size defaults to 4 * d_model.
    """

    def __init__(self, d_model: int, *, hidden_size: int | None = None):
        super().__init__(d_model, hidden_size or 4 * d_model)
        self.time_mix_key = nn.Parameter(torch.empty(1, 1, d_model))
        self.time_mix_receptance = nn.Parameter(torch.empty(1, 1, d_model))
        with torch.no_grad():
            # RWKV-LM's ramp at mid depth: an FFN is built without knowing its layer
            self.time_mix_key.copy_(_channel_ramp(d_model) ** 0.5)
            self.time_mix_receptance.copy_(_channel_ramp(d_model) ** 0.5)

    def interpolate(self, x, shifted):
        xk = x * self.time_mix_key + shifted * (1 - self.time_mix_key)
        xr = x * self.time_mix_receptance + shifted * (1 - self.time_mix_receptance)
        return xk, xr
