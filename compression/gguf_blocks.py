"""GGUF's own quantised blocks (Q8_0, Q4_0, Q4_1) as `QuantizedLinear` layers, bit-exactly.

A GGUF row of `in` weights is `in / 32` blocks (ggml-quants.h):

    Q8_0  fp16 d, 32 x int8 q                 w = q * d
    Q4_0  fp16 d, 16 bytes of nibbles         w = (q - 8) * d
    Q4_1  fp16 d, fp16 m, 16 bytes of nibbles  w = q * d + m

and a 4-bit block's byte j holds element j in its low nibble and element j + 16 in its high one.
They map onto QuantizedLinear's groups of 32 as: Q8_0 -> int8 codes, scale d; Q4_1 -> int4
codes, scale d, zero m; Q4_0 -> int4 codes, scale d, zero -8 d (the nibbles re-packed to
QuantizedLinear's order). `GGUFBlocks.dequantize` equals gguf's own `dequantize` exactly: q * d
is exact in float32 and each format adds at most one rounding, the same one gguf's does.

As a layer's scales and zeros follow the model's dtype (QuantizedLinear's rule, which the native
decode step relies on: one dtype for every float tensor), the fp16 d and m stay exact in a
float32, float64 or float16 model; a bfloat16 model rounds them to bfloat16 (3 fewer mantissa
bits, a relative change of at most 2^-8), as it rounds every other scale.

    blocks = read_blocks(reader_tensor.data, "q4_1")     # a GGUFReader tensor's raw rows
    layer = blocks.to_linear()                           # QuantizedLinear, int4 in groups of 32
    section = quantize_model_gguf(model, "q8_0")         # `zoo compress --weights q8_0`

The config section a GGUF-quantised model carries has method "gguf" and, for layers stored in
another format than the section's own (a Q8_0 head among Q4_1 layers), a "formats" entry.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .quantized_linear import QuantizedLinear, pack_int4
from .targets import (
    CompressionError,
    output_head,
    quantization_targets,
    replace_module,
)

BLOCK_SIZE = 32
# format name (as `zoo compress --weights` spells it) -> (GGML type name, QuantizedLinear weights)
GGUF_FORMATS = {"q8_0": ("Q8_0", "int8"), "q4_0": ("Q4_0", "int4"), "q4_1": ("Q4_1", "int4")}
GGUF_METHOD = "gguf"
# bytes of one block: fp16 d (and Q4_1's fp16 m), then the codes
BLOCK_BYTES = {"q8_0": 2 + BLOCK_SIZE, "q4_0": 2 + BLOCK_SIZE // 2, "q4_1": 4 + BLOCK_SIZE // 2}
GGUF_INSTALL = "pip install gguf"


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError(f"GGUF blocks need the gguf package: {GGUF_INSTALL}") from None
    return gguf


@dataclass
class GGUFBlocks:
    """One matrix (out, in) of GGUF blocks, unpacked: `codes` int8 (q8_0) or uint8 in [0, 15]
    (q4_0, q4_1), `scale` and `zero` float32 (out, in / 32), `zero` None for q8_0."""

    format: str
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None

    @property
    def weights(self) -> str:
        """The QuantizedLinear format these blocks are: "int8" or "int4"."""
        return GGUF_FORMATS[self.format][1]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def take_rows(self, rows: torch.Tensor) -> GGUFBlocks:
        """The blocks of the given output rows, in that order (a row permutation, such as the
        one llama.cpp's converter applies to q_proj and k_proj, moves whole rows of blocks)."""
        return GGUFBlocks(self.format, self.codes[rows], self.scale[rows],
                          None if self.zero is None else self.zero[rows])

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (out, in), equal to gguf's own dequantize."""
        out_features, in_features = self.shape
        weight = self.codes.to(torch.float32).view(out_features, -1, BLOCK_SIZE)
        weight = weight * self.scale[..., None]
        if self.zero is not None:
            weight = weight + self.zero[..., None]
        return weight.view(out_features, in_features)

    def to_linear(self, bias: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float32) -> QuantizedLinear:
        """A QuantizedLinear holding these codes in groups of 32, its scale, zero and bias in
        `dtype`; its dequantised weight equals `dequantize()` exactly unless `dtype` is
        bfloat16 (module doc)."""
        out_features, in_features = self.shape
        layer = QuantizedLinear(in_features, out_features, bias is not None,
                                weights=self.weights, group_size=BLOCK_SIZE, dtype=dtype)
        codes = self.codes if self.weights == "int8" else pack_int4(self.codes)
        layer.qweight = nn.Parameter(codes.contiguous(), requires_grad=False)
        layer.scale = nn.Parameter(self.scale.to(dtype).contiguous(), requires_grad=False)
        if self.zero is not None:
            layer.zero = nn.Parameter(self.zero.to(dtype).contiguous(), requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(dtype).clone())
        return layer


def _half_column(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 field at byte `start` of each block, (rows, n_blocks) as float32."""
    return np.ascontiguousarray(blocks[..., start:start + 2]).view(np.float16)[..., 0].astype(
        np.float32)


def read_blocks(data: np.ndarray, format: str) -> GGUFBlocks:
    """The blocks of raw GGUF rows: `data` uint8 (out, in / 32 * block bytes), as a GGUFReader
    tensor's `.data` holds them, in the format ("q8_0", "q4_0", "q4_1") its type names."""
    if format not in GGUF_FORMATS:
        raise ValueError(f"format={format!r} is not one of {sorted(GGUF_FORMATS)}")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] % BLOCK_BYTES[format]:
        raise ValueError(f"{format} rows must be uint8 (out, blocks * {BLOCK_BYTES[format]}), "
                         f"got {data.dtype} {data.shape}")
    rows = data.shape[0]
    blocks = data.reshape(rows, -1, BLOCK_BYTES[format])
    scale = torch.from_numpy(_half_column(blocks, 0))
    if format == "q8_0":
        codes = np.ascontiguousarray(blocks[..., 2:]).view(np.int8)
        return GGUFBlocks(format, torch.from_numpy(codes.reshape(rows, -1)), scale, None)
    nibbles = blocks[..., 4:] if format == "q4_1" else blocks[..., 2:]
    # byte j: element j in the low nibble, element j + 16 in the high one
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(rows, -1)
    zero = (torch.from_numpy(_half_column(blocks, 2)) if format == "q4_1"
            else -8 * scale)  # exact: a power of two times an fp16 value
    return GGUFBlocks(format, torch.from_numpy(np.ascontiguousarray(codes)), scale, zero)


def quantize_blocks(weight: torch.Tensor, format: str) -> GGUFBlocks:
    """`weight` (out, in) quantised as gguf's own `quantize` does (bit-exactly the file
    llama.cpp's converter would write for this float32 matrix), in = a multiple of 32."""
    gguf = _gguf()
    if format not in GGUF_FORMATS:
        raise ValueError(f"format={format!r} is not one of {sorted(GGUF_FORMATS)}")
    qtype = getattr(gguf.GGMLQuantizationType, GGUF_FORMATS[format][0])
    matrix = weight.detach().to(torch.float32).cpu().numpy()
    return read_blocks(gguf.quants.quantize(matrix, qtype), format)


def tensor_blocks(tensor) -> GGUFBlocks | None:
    """The blocks of a GGUFReader tensor stored as a Q8_0, Q4_0 or Q4_1 matrix; None for any
    other tensor (F32, F16, K-quants, vectors), which stays float."""
    formats = {ggml: name for name, (ggml, _) in GGUF_FORMATS.items()}
    format = formats.get(tensor.tensor_type.name)
    if format is None or len(tensor.shape) != 2:
        return None
    return read_blocks(tensor.data, format)


def gguf_file_blocks(path) -> dict[str, GGUFBlocks]:
    """{GGUF tensor name: its blocks} for every Q8_0, Q4_0 or Q4_1 matrix of a GGUF file."""
    reader = _gguf().GGUFReader(str(path))
    found = {tensor.name: tensor_blocks(tensor) for tensor in reader.tensors}
    return {name: blocks for name, blocks in found.items() if blocks is not None}


def gguf_section(layer_formats: dict[str, tuple[str, int]]) -> dict[str, Any]:
    """The config section for layers {name: (weights, group_size)} in model order, imported or
    quantised GGUF blocks: the most common format as the section's own, the others under
    "formats" (absent when every layer shares one)."""
    if not layer_formats:
        raise ValueError("a GGUF quantization section needs at least one layer")
    common = Counter(layer_formats.values()).most_common(1)[0][0]
    section = {"weights": common[0], "group_size": common[1], "method": GGUF_METHOD,
               "modules": list(layer_formats)}
    others = {name: {"weights": weights, "group_size": group}
              for name, (weights, group) in layer_formats.items() if (weights, group) != common}
    if others:
        section["formats"] = others
    return section


def untie_head(model: nn.Module) -> None:
    """Untie the output head from the embedding table (the head is about to become codes, the
    table stays float), keeping transformers' tied-keys mapping in step."""
    config = getattr(model, "config", None)
    head = output_head(model)
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is None or embedding is None or head.weight is not embedding.weight:
        return
    head.weight = nn.Parameter(embedding.weight.detach().clone(),
                               requires_grad=embedding.weight.requires_grad)
    if config is not None:
        config.tie_word_embeddings = False
        if hasattr(model, "get_expanded_tied_weights_keys"):
            model.all_tied_weights_keys = model.get_expanded_tied_weights_keys()


@torch.no_grad()
def quantize_model_gguf(model: nn.Module, format: str, skip: Iterable[str] = ()
                        ) -> dict[str, Any]:
    """Replace every linear layer compression takes (`linear_targets`) by the QuantizedLinear
    that gguf's quantiser gives for its weight in `format` ("q8_0", "q4_0", "q4_1"), in place;
    returns the config section (method "gguf") and sets it as `model.config.quantization`.
    A layer whose input width is not a multiple of 32 is a CompressionError naming weights."""
    if format not in GGUF_FORMATS:
        raise CompressionError("weights", format, f"GGUF formats: {', '.join(GGUF_FORMATS)}")
    targets = quantization_targets(model, skip, format)
    config = getattr(model, "config", None)
    for name, linear in targets:
        if linear.in_features % BLOCK_SIZE:
            raise CompressionError(
                "weights", format, f"stores blocks of {BLOCK_SIZE} inputs; {name} has "
                f"{linear.in_features} (leave it float with --skip '*.{name.rpartition('.')[2]}')")
    head = output_head(model)
    if any(module is head for _, module in targets):
        untie_head(model)
    layer_formats = {}
    for name, linear in targets:
        blocks = quantize_blocks(linear.weight, format)
        replace_module(model, name, blocks.to_linear(linear.bias, linear.weight.dtype).to(
            linear.weight.device))
        layer_formats[name] = (blocks.weights, BLOCK_SIZE)
    section = gguf_section(layer_formats)
    if config is not None:
        config.quantization = section
    return section
