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

from .base import FFN, Mixer, MixerState, check_padding_mask, fill_padding
from .linear import Linear
from .mamba import along_time, real_tokens_first
from .registry import register_ffn, register_mixer


def token_shift(x: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
    """x shifted one step back in time: (B, T, C) -> (B, T, C), row 0 is `last` (B, C) or 0."""
    first = x.new_zeros(x.shape[0], 1, x.shape[2]) if last is None else last[:, None].to(x.dtype)
    return torch.cat([first, x[:, :-1]], dim=1)


def masked_token_shift(
    x: torch.Tensor, last: torch.Tensor | None, padding_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_shift` over each row's real tokens only (padding_mask (B, T) True at them): every
    position gets the latest real token before it, or `last` (B, C) (zeros when None) where
    there is none. Returns (shifted (B, T, C), the row's last real token or `last`, (B, C),
    detached): a padded position neither moves the shift nor is seen by it."""
    check_padding_mask(x, padding_mask, "token shift")
    B, T, C = x.shape
    first = x.new_zeros(B, C) if last is None else last.to(x.dtype)
    history = torch.cat([first[:, None], x], dim=1)  # history[:, 0] is the token before x
    positions = torch.arange(1, T + 1, device=x.device).expand(B, T)
    latest = torch.where(padding_mask, positions, 0).cummax(dim=1).values  # up to t, in history
    before = torch.cat([latest.new_zeros(B, 1), latest[:, :-1]], dim=1)
    return along_time(history, before), along_time(history, latest[:, -1:])[:, 0].detach()


def shift_tokens(
    x: torch.Tensor, last: torch.Tensor | None, padding_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x shifted one real token back, the token the state carries on with): `token_shift` and
    `last_token` without padding, `masked_token_shift` with it."""
    if padding_mask is None:
        return token_shift(x, last), last_token(x)
    return masked_token_shift(x, last, padding_mask)


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


# The key of a padded step in `Rwkv4TimeMix._masked_wkv4` (all after the row's real tokens):
# finite, so no backend meets inf - inf, and e^(PAD_KEY - max) is 0 against any real key.
PAD_KEY = -1e30


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

    def forward(self, x, state=None, padding_mask=None):
        self.check_input(x, state)
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        shifted, shift = shift_tokens(x, state.shift, padding_mask)
        xk = x * self.time_mix_key + shifted * (1 - self.time_mix_key)
        xv = x * self.time_mix_value + shifted * (1 - self.time_mix_value)
        xr = x * self.time_mix_receptance + shifted * (1 - self.time_mix_receptance)
        k, v = self.key(xk), self.value(xv)
        r = torch.sigmoid(self.receptance(xr))
        if padding_mask is None:
            y, wkv = wkv4(self.time_decay, self.time_first, k, v, initial_state=state.wkv,
                          output_final_state=True, backend=self.backend)
        else:
            y, wkv = self._masked_wkv4(k, v, state.wkv, padding_mask)
        # the carried state leaves the autograd graph, as attention's KV cache does
        new_state = Rwkv4State(shift, wkv.detach())
        return fill_padding(self.output(r * y), padding_mask), new_state

    def _masked_wkv4(
        self, k: torch.Tensor, v: torch.Tensor, initial_state: torch.Tensor,
        padding_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """wkv4 over each row's real tokens only. Its decay is one per channel, the same at
        every step, so a padded step cannot be given decay 1 inside the op; instead each row's
        real tokens run first (exact: the recurrence is causal), its padding after them (a key
        of PAD_KEY and a zero value), and the state after the real tokens comes from
        `wkv4_state_after`, not from the op, whose state would have decayed over the padding."""
        acc = state_dtype(k.dtype)
        order, lengths = real_tokens_first(padding_mask)
        real = torch.arange(k.shape[1], device=k.device) < lengths[:, None]  # in packed order
        packed_k = torch.where(real[..., None], along_time(k, order).to(acc), PAD_KEY)
        packed_v = fill_padding(along_time(v, order).to(acc), real)
        y, _ = wkv4(self.time_decay, self.time_first, packed_k, packed_v,
                    initial_state=initial_state, backend=self.backend)
        y = fill_padding(along_time(y, torch.argsort(order, dim=1)), padding_mask).to(v.dtype)
        state = wkv4_state_after(self.time_decay.detach(), packed_k.detach(), packed_v.detach(),
                                 initial_state, lengths)
        return y, state


def wkv4_state_after(
    w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, initial_state: torch.Tensor,
    lengths: torch.Tensor,
) -> torch.Tensor:
    """The wkv4 state after the first lengths[b] tokens of each row of k, v (B, T, C), from
    initial_state (B, 3, C), in its dtype: all of a row's tokens carried at once, as the
    chunked form carries one chunk (token i weighs e^(k_i + (n - 1 - i) decay), the old state
    e^(max + n decay)), in float64 so that the exponents of long rows keep their digits. A row
    with lengths 0 gets its initial state back exactly."""
    wide = torch.float64
    num, den, mx = initial_state.to(wide).unbind(1)
    decay = -torch.exp(w.to(wide))
    steps_to_end = lengths[:, None] - 1 - torch.arange(k.shape[1], device=k.device)  # (B, T)
    token_log = torch.where((steps_to_end >= 0)[..., None],
                            k.to(wide) + steps_to_end[..., None].to(wide) * decay, -math.inf)
    state_log = mx + lengths[:, None].to(wide) * decay
    new_max = torch.maximum(token_log.amax(1), state_log)
    weights = torch.exp(token_log - new_max[:, None])
    carried = torch.exp(state_log - new_max)
    num = carried * num + (weights * v.to(wide)).sum(1)
    den = carried * den + weights.sum(1)
    return torch.stack([num, den, new_max], dim=1).to(initial_state.dtype)


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

    def forward(self, x, state=None, padding_mask=None):
        check_ffn_state(self, x, state)
        shifted, shift = shift_tokens(x, state.shift if state is not None else None,
                                      padding_mask)
        xk, xr = self.interpolate(x, shifted)
        k = torch.relu(self.key(xk)).square()
        out = torch.sigmoid(self.receptance(xr)) * self.value(k)
        return fill_padding(out, padding_mask), ChannelMixState(shift)


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
