"""`decode_attention`: one query per head against a KV cache, the decode step of softmax
attention (grouped / multi-query heads, keys cached transposed)."""

from __future__ import annotations

import torch

from ..backend import OpBackends, requires_grad, resolve_backend
from . import cpu
from .kv_quant import decode_attention_int8_reference
from .reference import decode_attention_reference
from .torch_fast import decode_attention_torch

CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OP_BACKENDS = OpBackends(
    "decode_attention", cpu_dtypes=CPU_KERNEL_DTYPES, backward=False,
    # looked up when called, so that replacing the module's function (tests do) takes effect
    cpu_kernel=lambda: _cpu_kernel_available(),
)


def decode_attention(
    q: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor, *,
    scale: float | None = None, backend: str = "auto",
) -> torch.Tensor:
    """softmax(q k^T * scale) v for one query per head over L cached tokens.

    Args:
        q: (B, H, D), the new token's queries.
        keys_t: (B, H_kv, D, L), the cached keys transposed (unit stride along L); query head
            h reads KV head h // (H // H_kv), as SDPA's enable_gqa.
        values: (B, H_kv, L, D).
        scale: defaults to D ** -0.5.
        backend: "auto" (without gradients: on the CPU the C++ kernel for float32, bfloat16
            and float16, on CUDA the Triton kernel outside torch.compile; PyTorch otherwise),
            "cpu" (the C++ kernel), "torch", "triton" or "reference". The kernels have no
            backward: decoding runs without gradients.
    Returns:
        (B, H, D) in q's dtype.
    """
    _check_shapes(q, keys_t, values)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    backend = resolve_backend(backend, q, OP_BACKENDS,
                              needs_grad=requires_grad(q, keys_t, values))
    if backend == "reference":
        return decode_attention_reference(q, keys_t, values, scale)
    if backend == "torch":
        return decode_attention_torch(q, keys_t, values, scale)
    if backend == "cpu":
        return cpu.decode_attention_cpu(q, keys_t, values, scale)
    from .triton_kernels import decode_attention_triton

    return decode_attention_triton(q, keys_t, values, scale)


INT8_BACKENDS = ("auto", "cpu", "reference")


def decode_attention_int8(
    q: torch.Tensor, k_codes_t: torch.Tensor, k_scales: torch.Tensor, v_codes: torch.Tensor,
    v_scales: torch.Tensor, *, scale: float | None = None, backend: str = "auto",
) -> torch.Tensor:
    """decode_attention over an int8 KV cache (kv_quant.py: one scale per token and head).

    Args:
        q: (B, H, D), float32, bfloat16 or float16.
        k_codes_t: (B, H_kv, D, L) int8, the cached keys' codes transposed; k_scales
            (B, H_kv, L) float32.
        v_codes: (B, H_kv, L, D) int8; v_scales (B, H_kv, L) float32.
        scale: defaults to D ** -0.5.
        backend: "auto" (the C++ kernel for CPU tensors where it builds, which reads the codes
            and dequantises in registers; the reference otherwise), "cpu" or "reference"
            (dequantise the cache, then decode_attention's reference).
    Returns:
        (B, H, D) in q's dtype.
    """
    _check_shapes(q, k_codes_t, v_codes)
    B, H_kv, L = k_codes_t.shape[0], k_codes_t.shape[1], k_codes_t.shape[3]
    for name, scales in (("k_scales", k_scales), ("v_scales", v_scales)):
        if tuple(scales.shape) != (B, H_kv, L):
            raise ValueError(f"decode_attention_int8: {name} {tuple(scales.shape)} must be "
                             f"(B, H_kv, L) = {(B, H_kv, L)}")
    if backend not in INT8_BACKENDS:
        raise ValueError(f"decode_attention_int8: backend={backend!r} is not one of "
                         f"{INT8_BACKENDS}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    on_cpu_kernel = (q.device.type == "cpu" and q.dtype in CPU_KERNEL_DTYPES
                     and not requires_grad(q))
    if backend == "cpu" and not (on_cpu_kernel and _cpu_kernel_available()):
        raise ValueError(f"decode_attention_int8: backend='cpu' takes CPU tensors of "
                         f"{CPU_KERNEL_DTYPES} without gradients, with the kernel built; got "
                         f"{q.dtype} on {q.device}")
    if backend == "cpu" or (backend == "auto" and on_cpu_kernel and _cpu_kernel_available()):
        return cpu.decode_attention_int8_cpu(q, k_codes_t, k_scales.float(), v_codes,
                                             v_scales.float(), scale)
    return decode_attention_int8_reference(q, k_codes_t, k_scales, v_codes, v_scales, scale)


@torch.compiler.assume_constant_result
def _cpu_kernel_available() -> bool:
    # run once, outside any graph: torch.compile treats the answer as a constant
    return cpu.load()


def _check_shapes(q: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor) -> None:
    if q.dim() != 3 or keys_t.dim() != 4 or values.dim() != 4:
        raise ValueError(
            "decode_attention: expected q (B, H, D), keys_t (B, H_kv, D, L), values "
            f"(B, H_kv, L, D); got {tuple(q.shape)}, {tuple(keys_t.shape)}, "
            f"{tuple(values.shape)}"
        )
    B, H, D = q.shape
    H_kv, L = keys_t.shape[1], keys_t.shape[3]
    if tuple(keys_t.shape[::2]) != (B, D) or tuple(values.shape) != (B, H_kv, L, D):
        raise ValueError(
            f"decode_attention: keys_t {tuple(keys_t.shape)} and values {tuple(values.shape)} "
            f"do not fit q {tuple(q.shape)} (need keys_t (B, H_kv, D, L), values (B, H_kv, L, D))"
        )
    if H % H_kv:
        raise ValueError(f"decode_attention: H={H} query heads is not a multiple of H_kv={H_kv}")
    if L == 0:
        raise ValueError("decode_attention: the cache is empty (L = 0)")


__all__ = [
    "decode_attention", "decode_attention_int8", "decode_attention_int8_reference",
    "decode_attention_reference", "decode_attention_torch",
]
