"""Softmax attention, the baseline: multi-head with grouped / multi-query KV heads, rotary
positions as Llama computes them, PyTorch SDPA (FlashAttention on GPU), an optional sliding
window, and the KV cache as its state.

Qwen3-Next's gated attention is three options of the same mixer, each off by default:
`qk_norm` (an RMSNorm over each head's q and k before the rotation, Qwen3's q_norm / k_norm),
`output_gate` (o * sigmoid(g_proj x) before o_proj; transformers packs g_proj's rows into
q_proj, head by head after each head's query rows) and `partial_rotary_factor` (the rotation
on the first int(head_dim * factor) channels of each head, the rest passed through).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from einops import rearrange

from zoo.kernels import decode_attention
from zoo.kernels.decode_attention import decode_attention_int8, kv_quant

from .base import Mixer, MixerState, fill_padding
from .linear import Linear
from .norms import RMSNorm
from .registry import register_mixer
from .rotary import Rotary


def rotary_at(rotary: Rotary, positions: torch.Tensor,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B, T, 1, D) at per-row positions (B, T), computed as Rotary.cos_sin
    computes them for a range, so a padded row's rotation equals the row's alone bit for bit."""
    freqs = positions[..., None].float() * rotary.inv_freq.float()
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype)[:, :, None, :], emb.sin().to(dtype)[:, :, None, :]


def row_positions(padding_mask: torch.Tensor, start: torch.Tensor | int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions (B, T), next start (B,)) of a padded batch's tokens: each row counts only its
    real tokens (padding_mask True), from `start` (an int or (B,) long); a padded token takes the
    position of the real token before it (start - 1 before the first)."""
    counts = padding_mask.long().cumsum(1)
    start = torch.as_tensor(start, dtype=torch.long, device=padding_mask.device)
    start = start.expand(padding_mask.shape[0]) if start.dim() == 0 else start
    return start[:, None] + counts - 1, start + counts[:, -1]


@dataclasses.dataclass
class AttentionState(MixerState):
    """The KV cache: preallocated buffers, `length` slots filled.

    k_t: keys transposed, (B, H_kv, D, capacity); v: values, (B, H_kv, capacity, D). Decoding
    reads both once per token: q @ k_t is then a product over contiguous rows (half the time
    of q @ k.T with keys time-major, measured at 8k tokens on the CPU), and the weighted sum of
    values reads each cached token's vector in one piece.

    Appending writes past `length` in place and returns a new state object that shares the
    buffers, so decoding does not copy the cache each token. An older state object stays valid
    (its slots are never overwritten) until a second branch appends from it.

    A cache that has seen padding (a padded batch) also knows each row's positions:
    key_positions (B, capacity) long, the position of each filled slot's token in its row (its
    real tokens counted from 0), -1 at a padded slot; next_positions (B,) long, each row's next
    position. Both None for a cache that never saw padding, whose slot i holds position
    `position - length + i` in every row (the native and compiled steps read only such caches).
    A padded cache with a window keeps every slot (the mask applies the window per row).
    """

    k_t: torch.Tensor
    v: torch.Tensor
    length: int = 0
    position: int = 0  # absolute position of the next token (differs from length with a window)
    window: int | None = None
    key_positions: torch.Tensor | None = None
    next_positions: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return self.v.shape[2]

    def nbytes(self) -> int:
        trimmed = self.window is not None and self.key_positions is None
        kept = min(self.length, self.window) if trimmed else self.length
        per_token = self.v.shape[1] * self.v.shape[3] * self.v.element_size()
        return 2 * kept * per_token

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H_kv, length, D) views of the filled slots (the keys a transposed view)."""
        return self.k_t[..., : self.length].transpose(2, 3), self.v[:, :, : self.length]

    def write(self, k: torch.Tensor, v: torch.Tensor,
              positions: torch.Tensor | None = None) -> AttentionState:
        """k, v (B, H_kv, T, D) into the T slots after `length`, which must be free; the new
        state shares the buffers. A padded cache takes the tokens' positions (B, T), -1 at
        padding."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"attention cache: {end} tokens do not fit {self.capacity} slots")
        self.k_t[..., start:end] = k.transpose(2, 3)
        self.v[:, :, start:end] = v
        next_positions = None
        if self.key_positions is not None:
            self.key_positions[:, start:end] = positions
            next_positions = torch.maximum(self.next_positions, positions.amax(1) + 1)
        return AttentionState(self.k_t, self.v, end, self.position + k.shape[2], self.window,
                              self.key_positions, next_positions)

    def with_row_positions(self) -> AttentionState:
        """This cache (sharing its buffers) with key_positions and next_positions, as a padded
        cache keeps them; itself if it has them."""
        if self.key_positions is not None:
            return self
        B, device = self.v.shape[0], self.v.device
        slots = torch.arange(self.capacity, device=device)
        first = self.position - self.length  # the position of slot 0 (a window drops some)
        key_positions = torch.where(slots < self.length, slots + first, -1)
        return dataclasses.replace(
            self, key_positions=key_positions.expand(B, -1).contiguous(),
            next_positions=torch.full((B,), self.position, dtype=torch.long, device=device))

    def with_capacity(self, capacity: int) -> AttentionState:
        """The same cache in new buffers of `capacity` slots (>= length)."""
        B, H, D, _ = self.k_t.shape
        k_t, v = self.k_t.new_empty(B, H, D, capacity), self.v.new_empty(B, H, capacity, D)
        k_t[..., : self.length] = self.k_t[..., : self.length]
        v[:, :, : self.length] = self.v[:, :, : self.length]
        key_positions = self.key_positions
        if key_positions is not None:
            key_positions = key_positions.new_full((B, capacity), -1)
            key_positions[:, : self.length] = self.key_positions[:, : self.length]
        return dataclasses.replace(self, k_t=k_t, v=v, key_positions=key_positions)

    def last(self, tokens: int) -> AttentionState:
        """Views of the last `tokens` filled slots as a full cache (a window's trim)."""
        start, end = self.length - tokens, self.length
        key_positions = None if self.key_positions is None else self.key_positions[:, start:end]
        return dataclasses.replace(
            self, k_t=self.k_t[..., start:end], v=self.v[:, :, start:end], length=tokens,
            key_positions=key_positions)

    def reserve(self, tokens: int) -> AttentionState:
        """Room for `tokens` more without growing, so a compiled decode step never sees the
        buffers change shape. A windowed cache trims itself when it grows: left as it is."""
        trims = self.window is not None and self.key_positions is None
        if trims or self.length + tokens <= self.capacity:
            return self
        return self.with_capacity(self.length + tokens)


# What an attention layer's KV cache may hold (ZooConfig.kv_cache): the model's float dtype,
# int8 codes per token, or KIVI's int4 (keys per channel in groups of tokens, values per token).
KV_CACHE_FORMATS = ("float", "int8", "int4")
KV_GROUP_SIZE = 32  # int4 keys: tokens sharing a scale and zero per channel (KIVI's G)
KV_RESIDUAL = 64  # int4: the most recent tokens kept in full precision (KIVI's R, a multiple of G)


@dataclasses.dataclass
class QuantizedAttentionState(MixerState):
    """A KV cache held as integer codes (kernels/decode_attention/kv_quant.py), `length`
    quantised slots filled, the buffers shared and appended in place as AttentionState's.

    int8: k_codes (B, H_kv, D, capacity) int8, keys transposed as AttentionState's k_t, with
    k_scales (B, H_kv, capacity) float32; v_codes (B, H_kv, capacity, D) int8 with v_scales
    (B, H_kv, capacity). Every token is quantised when written; the decode step reads the codes
    (decode_attention_int8).

    int4 (KIVI): k_codes (B, H_kv, D, capacity / 2) uint8, two tokens a byte, with k_scales and
    k_zeros (B, H_kv, D, capacity / group_size), one pair per channel and group of tokens;
    v_codes (B, H_kv, capacity, D / 2) uint8, two channels a byte, with v_scales and v_zeros
    (B, H_kv, capacity). The newest tokens wait in residual_k, residual_v (B, H_kv, r, D) in
    the model's float dtype; when r reaches residual + group_size the oldest group is
    quantised, so at least the last `residual` tokens are always exact.
    """

    k_codes: torch.Tensor
    k_scales: torch.Tensor
    v_codes: torch.Tensor
    v_scales: torch.Tensor
    k_zeros: torch.Tensor | None = None
    v_zeros: torch.Tensor | None = None
    residual_k: torch.Tensor | None = None
    residual_v: torch.Tensor | None = None
    length: int = 0  # quantised tokens
    position: int = 0  # absolute position of the next token
    kv_format: str = "int8"
    group_size: int = KV_GROUP_SIZE
    residual: int = KV_RESIDUAL

    @property
    def capacity(self) -> int:
        return self.v_codes.shape[2]

    @property
    def residual_length(self) -> int:
        return 0 if self.residual_k is None else self.residual_k.shape[2]

    @property
    def tokens(self) -> int:
        """Every cached token: the quantised ones and the residual."""
        return self.length + self.residual_length

    def nbytes(self) -> int:
        """Bytes of the filled slots per sequence: codes, scales, zeros and the residual."""
        H, D = self.v_codes.shape[1], self.k_codes.shape[2]
        if self.kv_format == "int8":
            return 2 * self.length * H * (D + self.k_scales.element_size())
        groups = self.length // self.group_size
        codes = 2 * self.length * H * D // 2
        key_pairs = 2 * groups * H * D * self.k_scales.element_size()
        value_pairs = 2 * self.length * H * self.v_scales.element_size()
        residual = 0 if self.residual_k is None else (
            2 * self.residual_length * H * D * self.residual_k.element_size())
        return codes + key_pairs + value_pairs + residual

    def dequantized(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Every cached token's keys and values, (B, H_kv, tokens, D) in dtype: the float
        cache this one stands for (the prefill's past, the int4 decode step, tests)."""
        n = self.length
        if self.kv_format == "int8":
            keys = kv_quant.dequantize_int8_per_token(
                self.k_codes[..., :n].transpose(2, 3), self.k_scales[..., :n], dtype)
            values = kv_quant.dequantize_int8_per_token(
                self.v_codes[:, :, :n], self.v_scales[..., :n], dtype)
            return keys, values
        if n == 0:  # everything still waits in the residual
            return self.residual_k.to(dtype), self.residual_v.to(dtype)
        groups = n // self.group_size
        keys = kv_quant.dequantize_keys_int4(
            self.k_codes[..., : n // 2], self.k_scales[..., :groups], self.k_zeros[..., :groups],
            dtype).transpose(2, 3)
        values = kv_quant.dequantize_values_int4(
            self.v_codes[:, :, :n], self.v_scales[..., :n], self.v_zeros[..., :n], dtype)
        if self.residual_k is not None:
            keys = torch.cat([keys, self.residual_k.to(dtype)], dim=2)
            values = torch.cat([values, self.residual_v.to(dtype)], dim=2)
        return keys, values

    def write(self, k: torch.Tensor, v: torch.Tensor) -> QuantizedAttentionState:
        """k, v (B, H_kv, T, D) after the cached tokens; the new state shares the quantised
        buffers (grown by doubling where they are full)."""
        if self.kv_format == "int8":
            return self._write_quantized(k, v, k.shape[2])._replace_position(k.shape[2])
        if self.residual_k is not None:
            k = torch.cat([self.residual_k, k], dim=2)
            v = torch.cat([self.residual_v, v], dim=2)
        # quantise whole groups while more than `residual` tokens would stay behind them
        flushed = max(0, k.shape[2] - self.residual) // self.group_size * self.group_size
        state = self._write_quantized(k[:, :, :flushed], v[:, :, :flushed], flushed)
        state = dataclasses.replace(state, residual_k=k[:, :, flushed:].contiguous(),
                                    residual_v=v[:, :, flushed:].contiguous())
        return state._replace_position(k.shape[2] - self.residual_length)

    def _replace_position(self, tokens: int) -> QuantizedAttentionState:
        return dataclasses.replace(self, position=self.position + tokens)

    def _write_quantized(self, k: torch.Tensor, v: torch.Tensor,
                         tokens: int) -> QuantizedAttentionState:
        if tokens == 0:
            return self
        state = self.reserve_quantized(tokens)
        start, end = state.length, state.length + tokens
        if self.kv_format == "int8":
            k_codes, k_scales = kv_quant.quantize_int8_per_token(k)
            v_codes, v_scales = kv_quant.quantize_int8_per_token(v)
            state.k_codes[..., start:end] = k_codes.transpose(2, 3)
            state.k_scales[..., start:end] = k_scales
            state.v_codes[:, :, start:end] = v_codes
            state.v_scales[..., start:end] = v_scales
        else:
            first, last = start // state.group_size, end // state.group_size
            k_codes, k_scales, k_zeros = kv_quant.quantize_keys_int4(
                k.transpose(2, 3), state.group_size)
            v_codes, v_scales, v_zeros = kv_quant.quantize_values_int4(v)
            state.k_codes[..., start // 2 : end // 2] = k_codes
            state.k_scales[..., first:last] = k_scales
            state.k_zeros[..., first:last] = k_zeros
            state.v_codes[:, :, start:end] = v_codes
            state.v_scales[..., start:end] = v_scales
            state.v_zeros[..., start:end] = v_zeros
        return dataclasses.replace(state, length=end)

    def reserve_quantized(self, tokens: int) -> QuantizedAttentionState:
        """Room for `tokens` more quantised slots, in new buffers of at least twice the
        capacity when they do not fit."""
        if self.length + tokens <= self.capacity:
            return self
        capacity = max(self.length + tokens, 2 * self.capacity, 2 * self.group_size)
        capacity = -(-capacity // self.group_size) * self.group_size  # whole int4 key groups
        return self.with_capacity(capacity)

    def with_capacity(self, capacity: int) -> QuantizedAttentionState:
        """The same cache in new quantised buffers of `capacity` slots (>= length)."""
        n, groups = self.length, self.length // self.group_size

        def grown(old: torch.Tensor | None, dim: int, slots: int, filled: int):
            if old is None:
                return None
            shape = list(old.shape)
            shape[dim] = slots
            new = old.new_zeros(shape)
            new.narrow(dim, 0, filled).copy_(old.narrow(dim, 0, filled))
            return new

        if self.kv_format == "int8":
            return dataclasses.replace(
                self, k_codes=grown(self.k_codes, 3, capacity, n),
                k_scales=grown(self.k_scales, 2, capacity, n),
                v_codes=grown(self.v_codes, 2, capacity, n),
                v_scales=grown(self.v_scales, 2, capacity, n))
        per_group = capacity // self.group_size
        return dataclasses.replace(
            self, k_codes=grown(self.k_codes, 3, capacity // 2, n // 2),
            k_scales=grown(self.k_scales, 3, per_group, groups),
            k_zeros=grown(self.k_zeros, 3, per_group, groups),
            v_codes=grown(self.v_codes, 2, capacity, n),
            v_scales=grown(self.v_scales, 2, capacity, n),
            v_zeros=grown(self.v_zeros, 2, capacity, n))

    def reserve(self, tokens: int) -> QuantizedAttentionState:
        """Room for `tokens` more without growing the quantised buffers."""
        return self.reserve_quantized(tokens)


def apply_kv_cache(module: torch.nn.Module, kv_format: str) -> None:
    """Set the KV cache format (KV_CACHE_FORMATS) of every softmax-attention layer in `module`
    (a mixer or a whole model): what ZooConfig.kv_cache asks of a model."""
    for layer in module.modules():
        if isinstance(layer, Attention):
            layer.kv_cache = kv_format


@register_mixer("attention")
class Attention(Mixer):
    """Causal softmax attention. x: (B, T, d_model) -> (B, T, d_model); state: the KV cache."""

    state_class = AttentionState
    bounded = False
    test_variants = [
        {"n_heads": 4, "n_kv_heads": 2},
        {"n_heads": 4, "n_kv_heads": 1, "window": 5},
        {"n_heads": 2, "rope_theta": None, "qkv_bias": True},
        {"n_heads": 4, "n_kv_heads": 2, "qk_norm": True, "output_gate": True,
         "partial_rotary_factor": 0.25},
    ]

    def __new__(cls, *args, qk_norm: bool = False, output_gate: bool = False,
                partial_rotary_factor: float = 1.0, **kwargs):
        # Qwen3-Next's options make a QwenAttention, so code that takes only the plain layout
        # by its type (zoo.infer.native's C++ step) declines these layers instead of
        # misreading them
        if cls is Attention and (qk_norm or output_gate or partial_rotary_factor != 1.0):
            cls = QwenAttention
        return super().__new__(cls)

    def __init__(
        self,
        d_model: int,
        layer_idx: int = 0,
        *,
        n_heads: int | None = None,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        rope_theta: float | None = 10000.0,
        window: int | None = None,
        qkv_bias: bool = False,
        out_bias: bool = False,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
        output_gate: bool = False,
        partial_rotary_factor: float = 1.0,
    ):
        super().__init__(d_model, layer_idx)
        n_heads = n_heads or max(1, d_model // 64)
        n_kv_heads = n_kv_heads or n_heads
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(
                    f"attention: d_model={d_model} is not divisible by n_heads={n_heads}; "
                    "choose n_heads dividing d_model or set head_dim"
                )
            head_dim = d_model // n_heads
        if n_heads % n_kv_heads:
            raise ValueError(
                f"attention: n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}"
            )
        if window is not None and window < 1:
            raise ValueError(f"attention: window={window} must be a positive number of tokens")
        if not 0.0 < partial_rotary_factor <= 1.0:
            raise ValueError(f"attention: partial_rotary_factor={partial_rotary_factor} must be "
                             "in (0, 1]")
        rotary_dim = int(head_dim * partial_rotary_factor)  # transformers' rounding
        if rope_theta is not None and (rotary_dim < 2 or rotary_dim % 2):
            raise ValueError(
                f"attention: partial_rotary_factor={partial_rotary_factor} of head_dim={head_dim} "
                f"rotates {rotary_dim} channels; rotary pairs need an even number >= 2"
            )
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.window = window
        self.q_proj = Linear(d_model, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = Linear(n_heads * head_dim, d_model, bias=out_bias)
        self.rotary = Rotary(rotary_dim, rope_theta) if rope_theta is not None else None
        self.q_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.g_proj = Linear(d_model, n_heads * head_dim, bias=qkv_bias) if output_gate else None
        self._kv_cache = "float"

    @property
    def kv_cache(self) -> str:
        """What the KV cache holds: "float" (the model's dtype), "int8" or "int4"
        (KV_CACHE_FORMATS; the model sets it from ZooConfig.kv_cache)."""
        return self._kv_cache

    @kv_cache.setter
    def kv_cache(self, kv_format: str) -> None:
        if kv_format not in KV_CACHE_FORMATS:
            raise ValueError(f"attention (layer {self.layer_idx}): kv_cache={kv_format!r} is not "
                             f"one of {KV_CACHE_FORMATS}")
        if kv_format != "float" and self.window is not None:
            raise ValueError(f"attention (layer {self.layer_idx}): kv_cache={kv_format!r} with "
                             f"window={self.window}: a quantised cache is kept whole, so only "
                             "kv_cache='float' takes a window")
        if kv_format == "int4" and self.head_dim % 2:
            raise ValueError(f"attention (layer {self.layer_idx}): kv_cache='int4' packs two "
                             f"channels a byte and needs an even head_dim, not {self.head_dim}")
        self._kv_cache = kv_format
        # the state contract's check (Mixer.check_input) takes the class this format keeps
        self.state_class = AttentionState if kv_format == "float" else QuantizedAttentionState

    def init_state(self, batch_size, device=None, dtype=None, capacity: int = 0):
        B, H, D = batch_size, self.n_kv_heads, self.head_dim
        dtype = dtype or self.q_proj.weight.dtype
        device = device or self.q_proj.weight.device
        if self.kv_cache != "float":
            return self._init_quantized_state(B, device, capacity)
        return AttentionState(
            torch.empty(B, H, D, capacity, device=device, dtype=dtype),
            torch.empty(B, H, capacity, D, device=device, dtype=dtype),
            window=self.window,
        )

    def _init_quantized_state(self, B: int, device: torch.device,
                              capacity: int) -> QuantizedAttentionState:
        H, D, G = self.n_kv_heads, self.head_dim, KV_GROUP_SIZE

        def zeros(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.zeros(*shape, device=device, dtype=dtype)

        if self.kv_cache == "int8":
            return QuantizedAttentionState(
                zeros(B, H, D, capacity, dtype=torch.int8), zeros(B, H, capacity),
                zeros(B, H, capacity, D, dtype=torch.int8), zeros(B, H, capacity),
                kv_format="int8")
        capacity = -(-capacity // G) * G
        return QuantizedAttentionState(
            zeros(B, H, D, capacity // 2, dtype=torch.uint8), zeros(B, H, D, capacity // G),
            zeros(B, H, capacity, D // 2, dtype=torch.uint8), zeros(B, H, capacity),
            k_zeros=zeros(B, H, D, capacity // G), v_zeros=zeros(B, H, capacity),
            kv_format="int4")

    def state_size(self, seq_len, dtype=torch.float32):
        kept = seq_len if self.window is None else min(seq_len, self.window)
        element = torch.empty((), dtype=dtype).element_size()
        H, D = self.n_kv_heads, self.head_dim
        if self.kv_cache == "int8":
            return 2 * kept * H * (D + 4)  # a float32 scale per token and head
        if self.kv_cache == "int4":
            # QuantizedAttentionState.write: whole groups leave the residual past R + G tokens
            flushed = max(0, kept - KV_RESIDUAL) // KV_GROUP_SIZE * KV_GROUP_SIZE
            residual = kept - flushed
            quantised = flushed * H * D + 2 * (flushed // KV_GROUP_SIZE) * H * D * 4 + (
                2 * flushed * H * 4)
            return quantised + 2 * residual * H * D * element
        return 2 * kept * H * D * element

    def _append(self, state: AttentionState, k: torch.Tensor, v: torch.Tensor,
                positions: torch.Tensor | None = None) -> AttentionState:
        """Write k, v (B, H_kv, T, D) after the cached tokens, growing the buffers by doubling.
        A padded cache takes the tokens' positions (B, T), -1 at padding."""
        T = k.shape[2]
        if state.length + T > state.capacity:
            if (self.window is not None and state.length >= self.window
                    and state.key_positions is None):
                # the next queries see at most window - 1 earlier tokens: drop the rest
                state = state.last(self.window - 1)
            state = state.with_capacity(max(state.length + T, 2 * state.capacity, 16))
        return state.write(k, v, positions)

    def _mask(self, T: int, past: int, device: torch.device) -> torch.Tensor | None:
        """Boolean (T, past + T) mask, or None where SDPA's own causal flag or no mask fits."""
        if self.window is None and (past == 0 or T == 1):
            return None
        query_index = past + torch.arange(T, device=device)[:, None]
        key_index = torch.arange(past + T, device=device)[None, :]
        allowed = key_index <= query_index
        if self.window is not None:
            allowed &= key_index > query_index - self.window
        return allowed

    def forward(self, x, state=None, padding_mask=None):
        self.check_input(x, state, padding_mask)
        B, T, _ = x.shape
        if state is None:
            state = self.init_state(B, x.device, x.dtype)
        if isinstance(state, QuantizedAttentionState):
            if padding_mask is not None:
                raise ValueError(f"attention (layer {self.layer_idx}): kv_cache="
                                 f"{state.kv_format!r} takes no padding_mask (a padded batch); "
                                 "decode padded batches with kv_cache='float'")
            return self._forward_quantized(x, state)
        if padding_mask is not None or state.key_positions is not None:
            return self._forward_padded(x, state, padding_mask)
        q, k = self._queries_keys(x, state.position)
        v = rearrange(self.v_proj(x), "b t (h d) -> b t h d", d=self.head_dim)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, H_kv, T, D), the cache's layout
        # the cache never joins the autograd graph; gradients stop at the carried state
        new_state = self._append(state, k.detach(), v.detach())
        past = new_state.length - T  # after a window's trim, fewer than state.length
        if T == 1 and past > 0 and not q.requires_grad:
            # decoding: straight from the buffers (SDPA reads transposed keys slowly: 1.8 ms
            # for one query over 8k cached tokens on the CPU; see kernels/decode_attention)
            out = self._one_query(q, new_state)
            return self.o_proj(self._gated(out, x)), new_state
        if past == 0:
            keys, values = k, v
        elif k.requires_grad:
            past_keys, past_values = new_state.keys_values()
            keys = torch.cat([past_keys[:, :, :past], k], dim=2)
            values = torch.cat([past_values[:, :, :past], v], dim=2)
        else:
            keys, values = new_state.keys_values()
            keys = keys.contiguous()  # SDPA reads time-major keys many times faster
        mask = self._mask(T, past, x.device)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values,
            attn_mask=mask, is_causal=T > 1 and mask is None and past == 0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        y = self.o_proj(self._gated(rearrange(out, "b h t d -> b t (h d)"), x))
        return y, new_state

    def _forward_quantized(self, x: torch.Tensor, state: QuantizedAttentionState
                           ) -> tuple[torch.Tensor, QuantizedAttentionState]:
        """forward over a quantised KV cache: the new tokens attend to the cached ones as the
        cache holds them (dequantised; codes read in registers when decoding int8) and to each
        other in full precision, as KIVI's prefill does."""
        T = x.shape[1]
        q, k = self._queries_keys(x, state.position)
        v = rearrange(self.v_proj(x), "b t (h d) -> b t h d", d=self.head_dim)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        past = state.tokens
        new_state = state.write(k.detach(), v.detach())
        if T == 1 and past > 0 and not q.requires_grad:
            out = self._one_query_quantized(q, new_state)
            return self.o_proj(self._gated(out, x)), new_state
        keys, values = k, v
        if past > 0:
            past_keys, past_values = state.dequantized(k.dtype)
            keys, values = torch.cat([past_keys, k], dim=2), torch.cat([past_values, v], dim=2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=self._mask(T, past, x.device),
            is_causal=T > 1 and past == 0, enable_gqa=self.n_kv_heads != self.n_heads,
        )
        y = self.o_proj(self._gated(rearrange(out, "b h t d -> b t (h d)"), x))
        return y, new_state

    def _one_query_quantized(self, q: torch.Tensor,
                             state: QuantizedAttentionState) -> torch.Tensor:
        """Decoding over a quantised cache: q (B, 1, H, D) -> (B, 1, H * D). int8 goes to
        decode_attention_int8 (on the CPU a C++ kernel reading the codes); int4 dequantises
        the cache and takes the float op."""
        B, n = q.shape[0], state.length
        q = q.reshape(B, self.n_heads, self.head_dim)
        scale = self.head_dim**-0.5
        if state.kv_format == "int8":
            out = decode_attention_int8(
                q, state.k_codes[..., :n], state.k_scales[..., :n], state.v_codes[:, :, :n],
                state.v_scales[..., :n], scale=scale)
        else:
            keys, values = state.dequantized(q.dtype)
            out = decode_attention(q, keys.transpose(2, 3).contiguous(), values, scale=scale)
        return out.reshape(B, 1, self.n_heads * self.head_dim)

    def _forward_padded(self, x: torch.Tensor, state: AttentionState,
                        padding_mask: torch.Tensor | None) -> tuple[torch.Tensor, AttentionState]:
        """The padding contract (layers/base.py): x (B, T, d_model), padding_mask (B, T) True
        at real tokens (None: all real, on a cache that has seen padding). Each row's tokens
        take the positions of its real tokens alone, and a query attends only to the real keys
        at or before its position (and within the window): what the row gives alone."""
        B, T, _ = x.shape
        real = (padding_mask.bool() if padding_mask is not None
                else torch.ones(B, T, dtype=torch.bool, device=x.device))
        state = state.with_row_positions()
        positions, _ = row_positions(real, state.next_positions)
        q, k = self._queries_keys(x, positions=positions)
        v = rearrange(self.v_proj(x), "b t (h d) -> b t h d", d=self.head_dim)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        new_state = self._append(state, k.detach(), v.detach(), torch.where(real, positions, -1))
        past = new_state.length - T
        if past == 0:
            keys, values = k, v
        else:
            past_keys, past_values = new_state.keys_values()
            keys = torch.cat([past_keys[:, :, :past], k], dim=2)
            values = torch.cat([past_values[:, :, :past], v], dim=2)
        key_positions = new_state.key_positions[:, None, : new_state.length]  # (B, 1, L)
        query_positions = positions[:, :, None]  # (B, T, 1)
        allowed = (key_positions >= 0) & (key_positions <= query_positions)
        if self.window is not None:
            allowed &= key_positions > query_positions - self.window
        # a padded query attends to everything, so its softmax stays finite; its output is
        # zeroed below and never read
        allowed |= ~real[:, :, None]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=allowed[:, None],
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        y = self.o_proj(self._gated(rearrange(out, "b h t d -> b t (h d)"), x))
        return fill_padding(y, real), new_state

    def _queries_keys(self, x: torch.Tensor, start: int = 0,
                      positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, d_model) at positions start.. (or at `positions` (B, T), a padded batch's
        per-row positions) -> q (B, T, H, D), k (B, T, H_kv, D): projected, normalised per head
        (qk_norm), then rotated (the first rotary_dim channels)."""
        q = rearrange(self.q_proj(x), "b t (h d) -> b t h d", d=self.head_dim)
        k = rearrange(self.k_proj(x), "b t (h d) -> b t h d", d=self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is None:
            return q, k
        if positions is not None:
            cos, sin = rotary_at(self.rotary, positions, q.dtype)
        else:
            cos, sin = self.rotary.cos_sin(start, x.shape[1], q.dtype)
        rotary_dim = self.rotary.head_dim
        if rotary_dim == self.head_dim:
            return Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)
        q = torch.cat([Rotary.apply(q[..., :rotary_dim], cos, sin), q[..., rotary_dim:]], -1)
        k = torch.cat([Rotary.apply(k[..., :rotary_dim], cos, sin), k[..., rotary_dim:]], -1)
        return q, k

    def _gated(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The heads' output (B, T, H * D) times sigmoid(g_proj x) where output_gate is on."""
        return out if self.g_proj is None else out * torch.sigmoid(self.g_proj(x))

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, d_model) from a fresh start -> (B, n_heads, T, T): the softmax weights
        each query gives each key (float32), what attention transfer teaches a student."""
        T = x.shape[1]
        q, k = self._queries_keys(x, 0)
        k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=2)
        scores = torch.einsum("bthd,bjhd->bhtj", q.float(), k.float()) * self.head_dim ** -0.5
        allowed = self._mask(T, 0, x.device)
        if allowed is None:
            allowed = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~allowed, -torch.inf).softmax(-1)

    def _one_query(self, q: torch.Tensor, state: AttentionState) -> torch.Tensor:
        """Decoding: q (B, 1, H, D) against the cache's filled slots -> (B, 1, H * D).

        A window keeps the last `window` keys; the op reads the buffers where they lie (on the
        CPU a C++ kernel that reads each cached key and value once for all the query heads of
        its group)."""
        keys_t, values = state.k_t[..., : state.length], state.v[:, :, : state.length]
        if self.window is not None:
            keys_t, values = keys_t[..., -self.window :], values[:, :, -self.window :]
        B = q.shape[0]
        out = decode_attention(q.reshape(B, self.n_heads, self.head_dim), keys_t, values,
                               scale=self.head_dim**-0.5)
        return out.reshape(B, 1, self.n_heads * self.head_dim)

    def forward_paged(
        self, x: torch.Tensor, positions: torch.Tensor, key_blocks: torch.Tensor,
        value_blocks: torch.Tensor, block_tables: torch.Tensor,
    ) -> torch.Tensor:
        """Decoding a batch whose rows stand at different positions, the KV cache in a pool of
        blocks (vLLM's PagedAttention layout, zoo.infer.paged): x (B, 1, d_model) -> (B, 1,
        d_model).

        positions (B,) long: each row's cached tokens, which is the new token's position.
        key_blocks (N, H_kv, D, block_size), keys transposed, and value_blocks (N, H_kv,
        block_size, D) (zoo.infer.paged's layout): the new keys and values are written into
        them in place. block_tables (B, M) long: each row's block ids in order, covering its
        position; entries past it are read and masked out, so any valid id may fill them.
        """
        B, H, D, block_size = x.shape[0], self.n_kv_heads, self.head_dim, key_blocks.shape[-1]
        q, k = self._queries_keys(x, positions=positions[:, None])
        v = rearrange(self.v_proj(x), "b t (h d) -> b t h d", d=D)
        written = block_tables.gather(1, (positions // block_size)[:, None])[:, 0]
        offsets = positions % block_size
        key_blocks[written, :, :, offsets] = k[:, 0].to(key_blocks.dtype)
        value_blocks[written, :, offsets] = v[:, 0].to(value_blocks.dtype)
        # index_select, not key_blocks[block_tables]: the same gather, several times faster
        blocks, width = block_tables.reshape(-1), block_tables.shape[1]
        length = width * block_size
        keys_t = (key_blocks.index_select(0, blocks).view(B, width, H, D, block_size)
                  .permute(0, 2, 3, 1, 4).reshape(B, H, D, length))
        values = (value_blocks.index_select(0, blocks).view(B, width, H, block_size, D)
                  .transpose(1, 2).reshape(B, H, length, D))
        key_index = torch.arange(length, device=x.device)[None, :]
        allowed = key_index <= positions[:, None]
        if self.window is not None:
            allowed &= key_index > positions[:, None] - self.window
        # one query per row, written out: SDPA with a mask takes its math path on the CPU,
        # which repeats K and V per query head and ran several times slower at 16 rows; here
        # the query heads of a KV head share its keys (B, H_kv, group, D) @ (B, H_kv, D, L)
        queries = q[:, 0].reshape(B, H, self.n_heads // H, D)
        scores = torch.matmul(queries, keys_t).float() * D**-0.5
        scores.masked_fill_(~allowed[:, None, None, :], float("-inf"))
        weights = torch.softmax(scores, dim=-1).to(values.dtype)
        out = torch.matmul(weights, values).reshape(B, 1, self.n_heads * D)
        return self.o_proj(self._gated(out, x))


class QwenAttention(Attention):
    """An `attention` mixer with any of Qwen3-Next's options (qk_norm, output_gate,
    partial_rotary_factor): the same module, under its own type so that code written for the
    plain Llama layout (the native C++ decode step) can tell it apart."""
