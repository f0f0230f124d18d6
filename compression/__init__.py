"""zoo.compression: weight-only quantisation (int8, int4; round to nearest or GPTQ) and pruning
(magnitude, Wanda, SparseGPT; N:M or unstructured) of zoo models, for every family.

    from zoo.compression import prune_model, quantize_model
    prune_model(model, "wanda", "2:4", calibration=ids)      # ids (B, T) of calibration text
    quantize_model(model, weights="int4", group_size=32)      # sets model.config.quantization
    quantize_model(model, "int4", 32, method="gptq", calibration=ids)
    model.save_pretrained(folder)                             # from_pretrained rebuilds it

It sits between the layers and the model: it imports zoo.layers (to know a MoE router), and
the model (zoo.model) imports it to rebuild quantised layers when loading.
"""

from .calibration import InputHessians, inverse_hessian_factor
from .gguf_blocks import GGUF_FORMATS, GGUFBlocks, quantize_model_gguf, read_blocks
from .gptq import gptq_quantize
from .prune import PRUNING_METHODS, PruningResult, Sparsity, keep_mask, parse_sparsity, prune_model
from .qat import FakeQuantLinear, fake_quantize, fake_quantize_model
from .quantize import (
    QUANTIZATION_METHODS,
    apply_quantized_layout,
    check_quantization_args,
    check_quantization_section,
    is_quantized,
    prepare_kernels,
    quantize_model,
    quantized_layers,
)
from .quantized_linear import (
    INT4_GROUP_SIZES,
    WEIGHT_FORMATS,
    QuantizedLinear,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from .sparsegpt import sparsegpt_prune
from .storage import decode_read_bytes, logical_parameters, weight_bytes
from .targets import CompressionError, linear_targets

__all__ = [
    "GGUF_FORMATS", "GGUFBlocks", "INT4_GROUP_SIZES", "PRUNING_METHODS", "QUANTIZATION_METHODS",
    "WEIGHT_FORMATS",
    "CompressionError", "InputHessians", "PruningResult", "QuantizedLinear", "Sparsity",
    "apply_quantized_layout", "check_quantization_args", "check_quantization_section",
    "decode_read_bytes", "gptq_quantize", "inverse_hessian_factor", "is_quantized", "keep_mask",
    "linear_targets", "logical_parameters", "pack_int4", "parse_sparsity", "prepare_kernels",
    "prune_model", "quantize_int4", "quantize_int8", "quantize_model", "quantize_model_gguf",
    "quantized_layers", "read_blocks",
    "FakeQuantLinear", "fake_quantize", "fake_quantize_model",
    "sparsegpt_prune", "unpack_int4", "weight_bytes",
]
