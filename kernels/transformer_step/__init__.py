"""`transformer_decode_step`: one decode step of a pre-norm transformer stack (softmax
attention with a KV cache, SwiGLU or GELU FFNs, RMSNorm) in a single call: on the CPU a C++
kernel that runs the whole step in one OpenMP region (cpu_kernel.cpp says why), beside its
PyTorch reference. zoo.infer.native maps a ZooForCausalLM onto its arguments."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from ..backend import OpBackends, resolve_backend
from ..cpu_build import build
from .reference import GLOBAL_FIELDS, LAYER_FIELDS, transformer_decode_step_reference

SOURCES = [
    Path(__file__).parent.parent / "decode_attention" / "attend.h",
    Path(__file__).with_name("int8_dots.h"),
    Path(__file__).with_name("cpu_kernel.cpp"),
]
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Quantised weights' groups the kernel takes on every build: it turns one vector's worth of codes
# into floats at a time (16 int8 codes, 32 int4 codes with AVX-512), and int8 per output channel.
INT8_GROUP_MULTIPLE, INT4_GROUP_MULTIPLE = 16, 32


@functools.cache
def load() -> bool:
    """Build and register the kernel (once per process); False, with a warning, if it cannot."""
    return build("zoo_cpu_transformer_step", SOURCES, "the CPU transformer decode step")


def int8_dots(enabled: bool | None = None) -> bool:
    """Whether the kernel's quantised products quantise their input to int8 blocks of 32 and
    use AVX-512 VNNI's integer dot products (int8_dots.h); `enabled` turns that on (where the
    build and CPU have it) or off (the float path) for this process, as ZOO_INT8_DOTS=0 does
    from the start. Returns whether it was on; False where the kernel did not build."""
    if not load():
        return False
    return bool(torch.ops.zoo_cpu.int8_dots(enabled))


# the reference is its only PyTorch form
OP_BACKENDS = OpBackends("transformer_decode_step", torch=False, triton=False, cpu_kernel=load,
                         cpu_dtypes=KERNEL_DTYPES)


def transformer_decode_step(
    ids: torch.Tensor,
    layer_weights: list[torch.Tensor | None],
    globals_: list[torch.Tensor | None],
    kv: list[torch.Tensor],
    lengths: list[int] | torch.Tensor,
    positions: list[int] | torch.Tensor,
    *,
    block_tables: torch.Tensor | None = None,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    eps: float,
    activation: str = "swiglu",
    greedy: bool = False,
    scales: list[torch.Tensor | None] | None = None,
    zeros: list[torch.Tensor | None] | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Feed one token per row through the stack; the caches take its keys and values in place.

    Args:
        ids: (B,) int64 token ids.
        layer_weights: per layer, the 16 entries of LAYER_FIELDS (None where absent: biases,
            and all FFN entries of a layer without one; for GELU, gate is fc_in and down
            fc_out). Weights (out, in) as nn.Linear keeps them.
        globals_: the entries of GLOBAL_FIELDS: embed (V_in, d), embed_norm (d,) or None,
            final_norm (d,), head (V, d), inv_freq (head_dim / 2,) float32 or None (no rotary).
        kv: per layer its KV cache, keys then values. Contiguous (block_tables None): k_t (B,
            H_kv, D, capacity) and v (B, H_kv, capacity, D). Paged: a pool of N blocks of S
            tokens, keys (N, H_kv, D, S) and values (N, H_kv, S, D) (zoo.infer.paged's layout).
        lengths, positions: the filled slots (the token goes to slot `length`, which must
            exist) and the token's rotary position: per layer one int for every row (a list),
            or int64 tensors (B,) (every layer the same) or (n_layers, B).
        block_tables: None (a contiguous cache), or (B, W) int64: row b's token t lives in
            block block_tables[b, t // S] at offset t % S; entries past a row's length are
            never read.
        activation: "swiglu" or "gelu".
        greedy: return the argmax tokens (B,) (int64; ties to the lowest id) in place of the
            logits (B, V) in the weights' dtype.
        scales, zeros: None (every weight float), or one entry per entry of layer_weights then
            globals: for a linear whose weight entry holds a QuantizedLinear's codes (int8 (N, K),
            or int4 as uint8 (N, K / 2), two codes a byte), its scale (N, K / group) and, int4
            only, its zero (N, K / group), in the weights' dtype; None elsewhere. The kernel
            takes int8 per output channel or in groups of a multiple of 16 inputs, and int4 in
            groups of a multiple of 32.
        backend: "cpu" (the C++ kernel), "reference" (PyTorch) or "auto" (the kernel where it
            builds and the weights are float32, bfloat16 or float16 on the CPU).
    """
    n_layers = len(kv) // 2
    if len(globals_) != len(GLOBAL_FIELDS) or len(layer_weights) != len(LAYER_FIELDS) * n_layers:
        raise ValueError(
            f"transformer_decode_step: expected {len(GLOBAL_FIELDS)} globals {GLOBAL_FIELDS} and "
            f"{len(LAYER_FIELDS)} layer weights per layer ({n_layers} layers from kv), got "
            f"{len(globals_)} and {len(layer_weights)}"
        )
    if activation not in ("swiglu", "gelu"):
        raise ValueError(f"transformer_decode_step: activation={activation!r} is not one of "
                         "('swiglu', 'gelu')")
    n_entries = len(layer_weights) + len(globals_)
    if (scales is None) != (zeros is None) or (
            scales is not None and not len(scales) == len(zeros) == n_entries):
        raise ValueError(
            "transformer_decode_step: scales and zeros must both be None or hold one entry per "
            f"layer weight and global ({n_entries})")
    backend = resolve_backend(backend, globals_[0], OP_BACKENDS)  # the embedding's dtype
    if block_tables is None:  # a contiguous cache: one block a row
        block_tables = _one_block_a_row(ids.shape[0])
    args = (ids, layer_weights, globals_, kv, block_tables,
            _per_layer_and_row(lengths, n_layers, ids.shape[0], "lengths"),
            _per_layer_and_row(positions, n_layers, ids.shape[0], "positions"), n_heads,
            n_kv_heads, head_dim, float(eps), activation, greedy, list(scales or []),
            list(zeros or []))
    if backend == "reference":
        return transformer_decode_step_reference(*args)
    return torch.ops.zoo_cpu.transformer_decode_step(*args)


@functools.lru_cache(maxsize=64)
def _one_block_a_row(batch_size: int) -> torch.Tensor:
    """The block table of a contiguous cache (B, ...): row b is block b."""
    return torch.arange(batch_size).view(batch_size, 1)


def _per_layer_and_row(values: list[int] | torch.Tensor, n_layers: int, batch_size: int,
                       name: str) -> torch.Tensor:
    """lengths or positions as the op takes them: (n_layers, B) or (B,) int64."""
    if isinstance(values, torch.Tensor):
        return values
    if len(values) != n_layers:
        raise ValueError(f"transformer_decode_step: {name} holds {len(values)} entries, one per "
                         f"layer ({n_layers}) expected")
    return torch.tensor(values, dtype=torch.long).view(n_layers, 1).expand(n_layers, batch_size)


__all__ = [
    "GLOBAL_FIELDS", "INT4_GROUP_MULTIPLE", "INT8_GROUP_MULTIPLE", "LAYER_FIELDS",
    "int8_dots",
    "transformer_decode_step",
    "transformer_decode_step_reference",
]
