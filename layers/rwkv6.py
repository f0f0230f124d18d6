"""RWKV-6 ("Finch"): time mixing (the `rwkv6` mixer) and channel mixing (the `rwkv6_cmix` FFN).

Time mixing per head, with data-dependent per-channel decay w_t in (0, 1) and bonus u:

    S_t = diag(w_t) S_{t-1} + k_t v_t^T,    o_t = r_t^T (S_{t-1} + diag(u) k_t v_t^T)

which is `zoo.kernels.linear_attention` with q = r, decay = log w_t (per step, head and key
channel), bonus = u and scale 1. What RWKV-6 adds around it:
- data-dependent token shift ("ddlerp"): each of w, k, v, r, g interpolates the token with the
  previous one by a static weight (time_maa_*) plus a low-rank function of the token
  (time_maa_w1 / time_maa_w2);
- data-dependent decay: w_t = exp(-exp(time_decay + tanh(x_w W1) W2));
- per-head group norm of the output (ln_x) and a SiLU gate g.
Parameter names follow RWKV-LM's x060 model (and the Hugging Face ports of its checkpoints).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from zoo.kernels import linear_attention
from zoo.kernels.wkv4 import state_dtype

from .base import Mixer, MixerState, fill_padding
from .linear import Linear
from .registry import register_ffn, register_mixer
from .rwkv4 import RwkvChannelMix, _channel_ramp, shift_tokens


@dataclasses.dataclass
class Rwkv6State(MixerState):
    """shift: (B, d_model) the last input token; wkv: (B, H, K, K) per-head state, float32."""

    shift: torch.Tensor
    wkv: torch.Tensor


@register_mixer("rwkv6")
class Rwkv6TimeMix(Mixer):
    """RWKV-6 time mixing. x: (B, T, d_model) -> (B, T, d_model).

    Options:
        head_size: K, channels per head (d_model / head_size heads).
        mix_lora: rank of the token-shift adapters (RWKV-LM: 32).
        decay_lora: rank of the decay adapter (RWKV-LM: 64).
        head_size_divisor: ln_x's epsilon is 1e-5 * head_size_divisor ** 2, as in RWKV-LM.
        n_layers: depth of the model, used only by the layer-dependent initialisation.
        chunk_size: tokens per chunk of the linear-attention op.
        backend: the linear_attention backend ("auto", "torch", "triton", "reference").
    """

    state_class = Rwkv6State
    bounded = True
    test_variants = [{"head_size": 16, "mix_lora": 8, "decay_lora": 16, "n_layers": 2,
                      "chunk_size": 16}]

    def __init__(
        self,
        d_model: int,
        layer_idx: int = 0,
        *,
        head_size: int = 64,
        mix_lora: int = 32,
        decay_lora: int = 64,
        head_size_divisor: int = 8,
        n_layers: int = 12,
        chunk_size: int = 64,
        backend: str = "auto",
    ):
        super().__init__(d_model, layer_idx)
        if d_model % head_size:
            raise ValueError(
                f"rwkv6: d_model={d_model} is not divisible by head_size={head_size}"
            )
        C = d_model
        self.head_size, self.n_heads = head_size, d_model // head_size
        self.mix_lora = mix_lora
        self.chunk_size, self.backend = chunk_size, backend
        self.time_maa_x = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_w = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_v = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_r = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_g = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_w1 = nn.Parameter(torch.empty(C, 5 * mix_lora))
        self.time_maa_w2 = nn.Parameter(torch.empty(5, mix_lora, C))
        self.time_decay = nn.Parameter(torch.empty(1, 1, C))
        self.time_decay_w1 = nn.Parameter(torch.empty(C, decay_lora))
        self.time_decay_w2 = nn.Parameter(torch.empty(decay_lora, C))
        self.time_faaaa = nn.Parameter(torch.empty(self.n_heads, head_size))
        self.receptance = Linear(C, C, bias=False)
        self.key = Linear(C, C, bias=False)
        self.value = Linear(C, C, bias=False)
        self.gate = Linear(C, C, bias=False)
        self.output = Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(self.n_heads, C, eps=1e-5 * head_size_divisor**2)
        self._init_time_parameters(n_layers)

    @torch.no_grad()
    def _init_time_parameters(self, n_layers: int) -> None:
        # RWKV-LM's x060 initialisation. The adapters' first matrices start at zero there; a
        # small random start instead lets every adapter parameter receive a gradient from the
        # first step (with zeros, W2 gets none until W1 has moved).
        C = self.d_model
        depth = self.layer_idx / max(n_layers - 1, 1)  # 0 .. 1
        shallow = 1.0 - self.layer_idx / max(n_layers, 1)  # 1 .. ~0
        ramp = _channel_ramp(C)
        for p in (self.time_maa_x, self.time_maa_w, self.time_maa_k):
            p.copy_(1.0 - ramp**shallow)
        self.time_maa_v.copy_(1.0 - (ramp**shallow + 0.3 * depth))
        self.time_maa_r.copy_(1.0 - ramp ** (0.5 * shallow))
        self.time_maa_g.copy_(1.0 - ramp ** (0.5 * shallow))
        for p in (self.time_maa_w1, self.time_maa_w2, self.time_decay_w1, self.time_decay_w2):
            p.uniform_(-1e-2, 1e-2)
        n = torch.arange(C, dtype=torch.float32) / max(C - 1, 1)
        self.time_decay.copy_((-6 + 5 * n ** (0.7 + 1.3 * depth))[None, None])
        zigzag = 0.1 * (((torch.arange(C) + 1) % 3) - 1).float()
        self.time_faaaa.copy_((depth * (1 - n) + zigzag).view(self.n_heads, self.head_size))

    def init_state(self, batch_size, device=None, dtype=None):
        device = device or self.key.weight.device
        dtype = dtype or self.key.weight.dtype
        K = self.head_size
        return Rwkv6State(
            torch.zeros(batch_size, self.d_model, device=device, dtype=dtype),
            torch.zeros(batch_size, self.n_heads, K, K, device=device, dtype=state_dtype(dtype)),
        )

    def state_size(self, seq_len, dtype=torch.float32):
        element = torch.empty((), dtype=dtype).element_size()
        wkv_element = torch.empty((), dtype=state_dtype(dtype)).element_size()
        return self.d_model * element + self.n_heads * self.head_size**2 * wkv_element

    def forward(self, x, state=None, padding_mask=None):
        self.check_input(x, state)
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        shifted, shift = shift_tokens(x, state.shift, padding_mask)
        delta = shifted - x
        # ddlerp: the five interpolation weights, each static + a low-rank function of the token
        lora = torch.tanh((x + delta * self.time_maa_x) @ self.time_maa_w1)
        lora = rearrange(lora, "b t (f r) -> f (b t) r", f=5)
        mix = torch.bmm(lora, self.time_maa_w2).view(5, *x.shape)  # (5, B, T, C)
        static = torch.stack([self.time_maa_w, self.time_maa_k, self.time_maa_v,
                              self.time_maa_r, self.time_maa_g])  # (5, 1, 1, C)
        xw, xk, xv, xr, xg = (x + delta * (static + mix)).unbind(0)
        heads = dict(d=self.head_size)
        r = rearrange(self.receptance(xr), "b t (h d) -> b t h d", **heads)
        k = rearrange(self.key(xk), "b t (h d) -> b t h d", **heads)
        v = rearrange(self.value(xv), "b t (h d) -> b t h d", **heads)
        g = F.silu(self.gate(xg))
        w = self.time_decay + torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2
        # log of w_t = exp(-exp(w)), in float32 at least: bf16 would round decays near 1 to 1
        log_decay = -torch.exp(w.to(torch.promote_types(w.dtype, torch.float32)))
        # a padded step keeps the state as it was: decay 1 (log 0) and no key written
        log_decay, k = fill_padding(log_decay, padding_mask), fill_padding(k, padding_mask)
        o, wkv = linear_attention(
            r, k, v, decay=rearrange(log_decay, "b t (h d) -> b t h d", **heads),
            bonus=self.time_faaaa, scale=1.0, initial_state=state.wkv, output_final_state=True,
            chunk_size=self.chunk_size, backend=self.backend,
        )
        o = self.ln_x(rearrange(o, "b t h d -> (b t) (h d)")).view_as(x)
        # the carried state leaves the autograd graph, as attention's KV cache does
        new_state = Rwkv6State(shift, wkv.detach())
        return fill_padding(self.output(o * g), padding_mask), new_state


@register_ffn("rwkv6_cmix")
class Rwkv6ChannelMix(RwkvChannelMix):
    """RWKV-6 channel mixing: RWKV-4's with RWKV-6's interpolation x + (prev - x) * time_maa_*
    (time_maa = 1 - RWKV-4's time_mix); hidden_size defaults to RWKV-LM's 3.5 * d_model
    rounded down to a multiple of 32.
    """

    def __init__(self, d_model: int, *, hidden_size: int | None = None):
        super().__init__(d_model, hidden_size or max(32, int(3.5 * d_model) // 32 * 32))
        self.time_maa_k = nn.Parameter(torch.empty(1, 1, d_model))
        self.time_maa_r = nn.Parameter(torch.empty(1, 1, d_model))
        with torch.no_grad():
            # RWKV-LM's ramp at mid depth: an FFN is built without knowing its layer
            self.time_maa_k.copy_(1.0 - _channel_ramp(d_model) ** 0.5)
            self.time_maa_r.copy_(1.0 - _channel_ramp(d_model) ** 0.5)

    def interpolate(self, x, shifted):
        delta = shifted - x
        return x + delta * self.time_maa_k, x + delta * self.time_maa_r
