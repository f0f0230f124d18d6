"""Hyena (Poli et al. 2023, "Hyena Hierarchy"): gated long convolutions with implicit filters.

Order N: the input is projected to N gates x_1..x_N and a value v, each through a short causal
depthwise convolution; then z_1 = v, z_{n+1} = x_n * (h_n * z_n + bias_n * z_n) and
y = out_proj(z_{N+1}) (the paper's Algorithm 2: N long convolutions, one filter per order and
channel; safari's HyenaOperator gates before its first convolution and keeps N - 1 filters).
The filters h_n are implicit: positional features of the lag -> small FFN with sine activations
-> exponential decay window, generated for any lag below `max_len`.

Decoding: a long convolution has no constant-size recurrence, so the state keeps the short
convolution's last W - 1 inputs and, for each order, every past input z_n of its long
convolution. A new token costs O(T * N * d) against a history of T tokens, and the state grows
linearly (`bounded = False`), as attention's KV cache does (N * d values per token here against
attention's 2 * d).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from zoo.kernels import causal_conv1d, compute_dtype, fft_conv

from .base import Mixer, MixerState, at_least_float32, check_padding_mask, fill_padding
from .linear import Linear
from .mamba import along_time, real_tokens_first
from .registry import register_mixer


@dataclasses.dataclass
class HyenaState(MixerState):
    """The short-conv state and the long convolutions' input history.

    conv: (B, W - 1, (N + 1) * d) the last W - 1 inputs of the short convolution.
    inputs: (B, N, capacity, d) preallocated history of each order's long-convolution input,
    `length` positions filled. Appending writes past `length` in place and returns a new state
    sharing the buffer (as attention's KV cache does): an older state object stays valid until a
    second branch appends from it.
    """

    conv: torch.Tensor
    inputs: torch.Tensor
    length: int = 0

    def nbytes(self) -> int:
        conv = self.conv[0].numel() * self.conv.element_size()
        _, N, _, d = self.inputs.shape
        return conv + N * self.length * d * self.inputs.element_size()

    def reserve(self, tokens: int) -> HyenaState:
        """Room for `tokens` more positions in the history (see MixerState.reserve)."""
        B, N, capacity, d = self.inputs.shape
        if self.length + tokens <= capacity:
            return self
        grown = self.inputs.new_empty(B, N, self.length + tokens, d)
        grown[:, :, : self.length] = self.inputs[:, :, : self.length]
        return dataclasses.replace(self, inputs=grown)


class Sine(nn.Module):
    """sin(freq * x) with a learned frequency per feature (the implicit filter's activation)."""

    def __init__(self, width: int, freq: float):
        super().__init__()
        self.freq = nn.Parameter(torch.full((width,), float(freq)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class FilterFFN(nn.Sequential):
    """The implicit filter's FFN, whose parameters stay float32 (float64 in a float64 model)
    when the model is cast to bfloat16 or float16: each sine layer multiplies a perturbation of
    its input by about its frequency (14), so rounding the first layer's weights to bf16 alone
    changes the filters by 30% (measured on hyena-tiny's defaults)."""

    def _apply(self, fn, recurse=True):
        return super()._apply(at_least_float32(fn), recurse)


@register_mixer("hyena")
class Hyena(Mixer):
    """Hyena operator of order N. x: (B, T, d_model) -> (B, T, d_model); state: HyenaState."""

    state_class = HyenaState
    bounded = False
    test_variants = [
        {"order": 3, "short_conv_width": 4, "filter_bands": 4},
        {"order": 1, "filter_width": 16, "sine_freq": 1.0, "max_len": 64},
    ]

    def __init__(
        self,
        d_model: int,
        layer_idx: int = 0,
        *,
        order: int = 2,
        max_len: int = 2048,
        filter_width: int = 64,
        filter_bands: int = 16,
        filter_depth: int = 2,
        sine_freq: float = 14.0,
        short_conv_width: int = 3,
        decay_fast: float = 0.3,
        decay_slow: float = 1.5,
        decay_target: float = 1e-2,
    ):
        """Options (defaults follow safari's Pile configuration of the filter):

        order: N, the number of long convolutions and gates.
        max_len: the longest sequence (prefill plus decoded tokens) the filters are generated
            for; lags are normalised by it, so it is part of the model, not a runtime limit.
        filter_width, filter_depth: width and number of hidden layers of the filter FFN.
        filter_bands: sin/cos pairs in the positional features (their size is 1 + 2 * bands).
        sine_freq: initial frequency of the FFN's sine activations.
        short_conv_width: width W of the short depthwise convolution.
        decay_fast, decay_slow, decay_target: the decay window reaches `decay_target` at
            `decay_fast` * max_len in the fastest channel and `decay_slow` * max_len in the
            slowest, channels spread linearly between.
        """
        super().__init__(d_model, layer_idx)
        if order < 1:
            raise ValueError(f"hyena: order={order} must be >= 1")
        if max_len < 1:
            raise ValueError(f"hyena: max_len={max_len} must be a positive number of tokens")
        if short_conv_width < 1:
            raise ValueError(f"hyena: short_conv_width={short_conv_width} must be >= 1")
        if filter_bands < 1 or filter_width < 1 or filter_depth < 0:
            raise ValueError(
                f"hyena: filter_bands={filter_bands} and filter_width={filter_width} must be >= 1,"
                f" filter_depth={filter_depth} >= 0"
            )
        if not 0 < decay_target < 1 or decay_fast <= 0 or decay_slow <= 0:
            raise ValueError(
                f"hyena: decay_target={decay_target} must be in (0, 1) and decay_fast="
                f"{decay_fast}, decay_slow={decay_slow} positive fractions of max_len"
            )
        self.order, self.max_len, self.filter_bands = order, max_len, filter_bands
        width = (order + 1) * d_model
        self.in_proj = Linear(d_model, width)
        # depthwise, like nn.Conv1d(width, width, W, groups=width) and initialised as it is
        bound = 1 / math.sqrt(short_conv_width)
        self.short_conv_weight = nn.Parameter(torch.empty(width, short_conv_width).uniform_(
            -bound, bound))
        self.short_conv_bias = nn.Parameter(torch.empty(width).uniform_(-bound, bound))
        layers: list[nn.Module] = [Linear(1 + 2 * filter_bands, filter_width),
                                   Sine(filter_width, sine_freq)]
        for _ in range(filter_depth):
            layers += [Linear(filter_width, filter_width), Sine(filter_width, sine_freq)]
        layers.append(Linear(filter_width, order * d_model, bias=False))
        self.filter_ffn = FilterFFN(*layers)
        # the skip term of each long convolution ("D" in S4 / safari's filter bias)
        self.filter_bias = nn.Parameter(torch.randn(order, d_model))
        self.out_proj = Linear(d_model, d_model)
        # decay rates per channel of every order: exp(-rate * lag / max_len) reaches
        # decay_target at decay_fast (fastest) .. decay_slow (slowest) times max_len. Fixed, not
        # learned (safari's modulation_lr = 0), so they are plain numbers, not a buffer.
        self.decay_rates = (-math.log(decay_target) / decay_slow,
                            -math.log(decay_target) / decay_fast)
        self._filter_cache: tuple[tuple, torch.Tensor] | None = None

    # -- the implicit filters ---------------------------------------------------------------

    def positional_features(self, length: int, device=None, dtype=None) -> torch.Tensor:
        """(length, 1 + 2 * bands): the lag normalised by max_len, then cos / sin of the lag at
        frequencies 0..bands-1 cycles per max_len (safari's complex exponential embedding)."""
        lag = torch.arange(length, device=device, dtype=torch.float32)
        t = lag / self.max_len
        freqs = torch.linspace(1e-4, self.filter_bands - 1, self.filter_bands, device=device)
        angle = 2 * math.pi * t[:, None] * freqs
        features = torch.cat([t[:, None], torch.cos(angle), -torch.sin(angle)], dim=-1)
        return features.to(dtype) if dtype is not None else features

    def decay_window(self, length: int, device=None, dtype=None) -> torch.Tensor:
        """(length, N * d): exp(-rate_c * lag / max_len), rates spread over the channels."""
        t = torch.arange(length, device=device, dtype=torch.float32) / self.max_len
        rates = torch.linspace(*self.decay_rates, self.order * self.d_model, device=device)
        window = torch.exp(-t[:, None] * rates)
        return window.to(dtype) if dtype is not None else window

    def compute_filters(self, length: int) -> torch.Tensor:
        """(length, N, d): h_n[lag, channel] for lags 0..length-1, differentiable.

        Computed in float32 (float64 for a float64 model) whatever the other weights' dtype:
        the sine activations take arguments of tens of radians, which bf16 rounds by up to
        0.06 radian, amplified by each sine layer after (see FilterFFN).
        """
        dtype = compute_dtype(self.filter_bias.dtype)
        device = self.filter_bias.device
        # autocast would run the FFN's products in bf16 again (a bf16 training run)
        with torch.autocast(device.type, enabled=False):
            z = self.positional_features(length, device, dtype)
            for layer in self.filter_ffn:
                if isinstance(layer, nn.Linear):
                    bias = None if layer.bias is None else layer.bias.to(dtype)
                    z = F.linear(z, layer.weight.to(dtype), bias)
                else:
                    z = layer(z)
            h = z * self.decay_window(length, device, dtype)
        return h.view(length, self.order, self.d_model)

    def long_filters(self, length: int) -> torch.Tensor:
        """(length, N, d), the filters for lags below `length`.

        Without autograd (decoding) they are cached, grown to the next power of two, so a decode
        step does not rerun the filter FFN over the whole history (it would cost ~100x the
        convolution itself). The cache key holds every parameter's version counter and storage,
        which any optimizer step, load_state_dict or .to() changes.
        """
        params = list(self.filter_ffn.parameters())
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return self.compute_filters(length)
        if torch.compiler.is_compiling():
            # a compiled decode step: the eager prefill before it validated the cache, and the
            # version / pointer key cannot be traced
            if self._filter_cache is not None and self._filter_cache[1].shape[0] >= length:
                return self._filter_cache[1][:length]
            return self.compute_filters(length)
        key = tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in params)
        if (self._filter_cache is None or self._filter_cache[0] != key
                or self._filter_cache[1].shape[0] < length):
            size = min(self.max_len, 1 << max(length - 1, 0).bit_length())
            self._filter_cache = (key, self.compute_filters(max(size, length)))
        return self._filter_cache[1][:length]

    # -- the state contract ---------------------------------------------------------------

    def init_state(self, batch_size, device=None, dtype=None, capacity: int = 0):
        device = device or self.in_proj.weight.device
        dtype = dtype or self.in_proj.weight.dtype
        width, W = self.short_conv_weight.shape
        return HyenaState(
            torch.zeros(batch_size, W - 1, width, device=device, dtype=dtype),
            torch.empty(batch_size, self.order, capacity, self.d_model, device=device,
                        dtype=dtype),
        )

    def state_size(self, seq_len, dtype=torch.float32):
        element = torch.empty((), dtype=dtype).element_size()
        width, W = self.short_conv_weight.shape
        return element * ((W - 1) * width + self.order * seq_len * self.d_model)

    def _reserve(self, state: HyenaState, T: int) -> torch.Tensor:
        """The input-history buffer with room for T more positions (grown by doubling)."""
        buf, length = state.inputs, state.length
        if length + T <= buf.shape[2]:
            return buf
        capacity = min(max(length + T, 2 * buf.shape[2], 16), self.max_len)
        grown = buf.new_empty(buf.shape[0], self.order, capacity, self.d_model)
        grown[:, :, :length] = buf[:, :, :length]
        return grown

    def forward(self, x, state=None, padding_mask=None):
        self.check_input(x, state)
        B, T, d = x.shape
        if state is None:
            state = self.init_state(B, x.device, x.dtype)
        P = state.length
        end = P + T
        if end > self.max_len:
            raise ValueError(
                f"hyena (layer {self.layer_idx}): position {P + T} (history {P} + {T} new "
                f"tokens) is past max_len={self.max_len}, the longest lag its filters are "
                "generated for; build the model with a larger max_len"
            )
        if padding_mask is not None:
            return self._forward_padded(x, state, padding_mask)
        z, conv_state = causal_conv1d(
            self.in_proj(x), self.short_conv_weight, self.short_conv_bias,
            initial_state=state.conv.to(x.dtype), output_final_state=True,
        )
        *gates, v = z.split(d, dim=-1)
        h = self.long_filters(P + T)
        buf = self._reserve(state, T)
        for n in range(self.order):
            past = buf[:, n, :P] if P else None
            if past is not None and torch.is_grad_enabled():
                # the next order's write bumps the buffer's version; a copy keeps what the
                # convolution saved for backward intact (training with a carried state only)
                past = past.clone()
            # the history never joins the autograd graph: gradients stop at the carried state
            buf[:, n, P : P + T] = v.detach()
            v = gates[n] * fft_conv(v, h[:, n].t(), self.filter_bias[n], initial_state=past)
        y = self.out_proj(v)
        return y, HyenaState(conv_state, buf, P + T)

    def _forward_padded(
        self, x: torch.Tensor, state: HyenaState, padding_mask: torch.Tensor
    ) -> tuple[torch.Tensor, HyenaState]:
        """forward over each row's real tokens only (padding_mask (B, T) True at them).

        Each row's real tokens are packed first, where they stand alone, so the short and the
        long convolutions compute them exactly. The history all rows share grows by T: a row's
        m padded positions go in front of its history as zeros, which add exactly nothing to
        any later convolution, and its real inputs at its end, at the lags they have alone. So
        padding counts against max_len, and a padded call writes a new history buffer (the
        rows' histories move) where an unpadded one appends in place.
        """
        check_padding_mask(x, padding_mask, "Hyena")
        B, T, d = x.shape
        P = state.length
        order, lengths = real_tokens_first(padding_mask)
        real = torch.arange(T, device=x.device) < lengths[:, None]  # in packed order
        projected = self.in_proj(along_time(x, order))
        conv_state = state.conv.to(x.dtype)
        z, _ = causal_conv1d(projected, self.short_conv_weight, self.short_conv_bias,
                             initial_state=conv_state)
        conv_window = (lengths[:, None]
                       + torch.arange(conv_state.shape[1], device=x.device))
        conv_state = along_time(torch.cat([conv_state, projected], dim=1), conv_window)
        *gates, v = z.split(d, dim=-1)
        h = self.long_filters(P + T)
        # row b's history: its T - lengths[b] zeros, its old history, its real inputs
        moved = lengths[:, None] + torch.arange(P + T, device=x.device)
        buf = state.inputs.new_empty(B, self.order, P + T, d)
        for n in range(self.order):
            v = fill_padding(v, real)
            past = state.inputs[:, n, :P] if P else None
            history = [v.new_zeros(B, T, d), v.detach()]
            if past is not None:
                history.insert(1, past)
            buf[:, n] = along_time(torch.cat(history, dim=1), moved)
            v = gates[n] * fft_conv(v, h[:, n].t(), self.filter_bias[n], initial_state=past)
        y = along_time(self.out_proj(v), torch.argsort(order, dim=1))
        return fill_padding(y, padding_mask), HyenaState(conv_state.detach(), buf, P + T)
