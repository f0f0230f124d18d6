"""The CPU kernel of `decode_attention`: attend.h and cpu_kernel.cpp, compiled on first use
(kernels/cpu_build.py) and registered as `torch.ops.zoo_cpu.decode_attention`, an operator that
torch.compile calls from its graph. Where it cannot be built, `decode_attention` takes its
PyTorch path; ZOO_CPU_KERNELS=0 turns it off.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from ..cpu_build import build

SOURCES = [Path(__file__).with_name("attend.h"), Path(__file__).with_name("cpu_kernel.cpp")]


@functools.cache
def load() -> bool:
    """Build and register the kernel (once per process); False, with a warning, if it cannot."""
    if not build("zoo_cpu_kernels", SOURCES, "the CPU decode-attention kernel"):
        return False
    if not _registered_fake:  # once per process, however often load() runs
        torch.library.register_fake("zoo_cpu::decode_attention")(_shape_of_output)
        torch.library.register_fake("zoo_cpu::decode_attention_int8")(_shape_of_int8_output)
        _registered_fake.append(True)
    return True


_registered_fake: list[bool] = []


def _shape_of_output(q, keys_t, values, scale):
    # what torch.compile traces in place of the kernel: the output's shape, dtype and device
    return q.new_empty(q.shape)


def _shape_of_int8_output(q, k_codes_t, k_scales, v_codes, v_scales, scale):
    return q.new_empty(q.shape)


def decode_attention_cpu(q: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """q (B, H, D); keys_t (B, H_kv, D, L); values (B, H_kv, L, D), all float32, bfloat16 or
    float16 -> (B, H, D) in their dtype."""
    return torch.ops.zoo_cpu.decode_attention(q, keys_t, values, scale)


def decode_attention_int8_cpu(q: torch.Tensor, k_codes_t: torch.Tensor, k_scales: torch.Tensor,
                              v_codes: torch.Tensor, v_scales: torch.Tensor,
                              scale: float) -> torch.Tensor:
    """q (B, H, D) float32, bfloat16 or float16; the int8 cache: k_codes_t (B, H_kv, D, L) and
    v_codes (B, H_kv, L, D) int8, k_scales and v_scales (B, H_kv, L) float32 -> (B, H, D) in
    q's dtype."""
    return torch.ops.zoo_cpu.decode_attention_int8(q, k_codes_t, k_scales, v_codes, v_scales,
                                                   scale)
