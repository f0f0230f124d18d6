"""A KV cache held as integer codes: int8 per token, and KIVI's int4 (Liu et al. 2024, "KIVI: A
Tuning-Free Asymmetric 2bit Quantization for KV Cache": keys per channel over groups of tokens,
values per token). Quantising, dequantising, and the plain definition of decode attention over
an int8 cache (dequantise, then the float reference): the oracle of the C++ kernel.

int8: symmetric, one float32 scale per (row, KV head, token) for keys and one for values;
code = round(x / scale), scale = max|x| / 127 over the head's D channels, so every element is
within scale / 2 of code * scale.
int4: asymmetric, 16 levels from the minimum to the maximum, code = round((x - zero) / scale),
scale = (max - min) / 15: keys per (channel, group of G tokens), values per (token, head);
every element is within scale / 2 of code * scale + zero. Two codes to a byte: keys pack
neighbouring tokens (the cache keeps them transposed), values neighbouring channels.
"""

from __future__ import annotations

import torch

from .reference import decode_attention_reference

INT8_LEVELS = 127
INT4_LEVELS = 15


def quantize_int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., T, D) float -> (codes (..., T, D) int8, scales (..., T) float32)."""
    x = x.float()
    scales = x.abs().amax(dim=-1) / INT8_LEVELS
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero token: code 0
    codes = torch.round(x / safe[..., None]).clamp_(-INT8_LEVELS, INT8_LEVELS)
    return codes.to(torch.int8), scales


def dequantize_int8_per_token(codes: torch.Tensor, scales: torch.Tensor,
                              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes (..., T, D) int8, scales (..., T) -> (..., T, D) in dtype."""
    return (codes.float() * scales[..., None]).to(dtype)


def quantize_int4(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x float, reduced along `dim` -> (codes uint8 0..15 in x's shape, scales, zeros), the
    scales and zeros float32 with `dim` removed."""
    x = x.float()
    low, high = x.amin(dim=dim), x.amax(dim=dim)
    scales = (high - low) / INT4_LEVELS
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # a constant group: code 0
    codes = torch.round((x - low.unsqueeze(dim)) / safe.unsqueeze(dim)).clamp_(0, INT4_LEVELS)
    return codes.to(torch.uint8), scales, low


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes (..., 2n) uint8 0..15 -> (..., n) uint8: element 2i in the low nibble, 2i + 1 high."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(..., n) uint8 -> (..., 2n) uint8 codes, pack_int4's inverse."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def quantize_keys_int4(keys_t: torch.Tensor, group_size: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """keys_t (B, H, D, n * group_size) float -> (codes (B, H, D, n * group_size / 2) uint8,
    scales (B, H, D, n), zeros (B, H, D, n)): per channel over each group of tokens."""
    B, H, D, L = keys_t.shape
    codes, scales, zeros = quantize_int4(keys_t.reshape(B, H, D, L // group_size, group_size), -1)
    return pack_int4(codes.reshape(B, H, D, L)), scales, zeros


def dequantize_keys_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """quantize_keys_int4's codes, scales and zeros -> keys_t (B, H, D, L) in dtype."""
    B, H, D, n = scales.shape
    codes = unpack_int4(packed).reshape(B, H, D, n, -1).float()
    return (codes * scales[..., None] + zeros[..., None]).reshape(B, H, D, -1).to(dtype)


def quantize_values_int4(values: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """values (B, H, T, D) float, D even -> (codes (B, H, T, D / 2) uint8, scales (B, H, T),
    zeros (B, H, T)): per token over its D channels."""
    codes, scales, zeros = quantize_int4(values, -1)
    return pack_int4(codes), scales, zeros


def dequantize_values_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """quantize_values_int4's codes, scales and zeros -> values (B, H, T, D) in dtype."""
    codes = unpack_int4(packed).float()
    return (codes * scales[..., None] + zeros[..., None]).to(dtype)


def decode_attention_int8_reference(
    q: torch.Tensor, k_codes_t: torch.Tensor, k_scales: torch.Tensor, v_codes: torch.Tensor,
    v_scales: torch.Tensor, scale: float,
) -> torch.Tensor:
    """decode_attention over an int8 cache, by its definition: dequantise (in q's compute
    dtype), then the float reference. k_codes_t (B, H_kv, D, L) int8, k_scales (B, H_kv, L),
    v_codes (B, H_kv, L, D) int8, v_scales (B, H_kv, L) -> (B, H, D) in q's dtype."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    keys_t = k_codes_t.to(compute) * k_scales.to(compute)[:, :, None, :]
    values = v_codes.to(compute) * v_scales.to(compute)[..., None]
    return decode_attention_reference(q.to(compute), keys_t, values, scale).to(q.dtype)
