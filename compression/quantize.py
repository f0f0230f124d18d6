"""Weight-only quantisation of a model (round to nearest, or GPTQ) and the config section that
lets `from_pretrained` rebuild the quantised layers before loading their tensors.

    section = quantize_model(model, weights="int4", group_size=32)
    model.save_pretrained(folder)     # config.json carries `quantization` = section

The section (config.json's "quantization"):

    weights     "int8" (symmetric, per output channel) or "int4" (groups along the input,
                scale and zero)
    group_size  null for int8; 32, 64 or 128 for int4
    method      how the codes were chosen: "rtn" (round to nearest), "gptq" (calibrated,
                compression/gptq.py; same stored layout) or "gguf" (a GGUF file's Q8_0 / Q4_0 /
                Q4_1 blocks kept, or gguf's own quantiser: compression/gguf_blocks.py, whose
                layers are any format QuantizedLinear stores, e.g. int8 in groups of 32)
    modules     the qualified names of the QuantizedLinear layers, in model order
    formats     (gguf only, when the layers differ) {module name: {"weights", "group_size"}}
                for the layers stored in another format than the section's own (a GGUF file's
                Q8_0 head, int8 in groups of 32, among its Q4_1 layers)
    rounded_to_nearest  (gptq only, when there are such) the layers GPTQ had no calibration
                inputs for (their weight is read directly, never called), rounded to nearest
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .calibration import check_calibration
from .gptq import gptq_quantize_layers
from .quantized_linear import (
    INT4_GROUP_SIZES,
    WEIGHT_FORMATS,
    QuantizedLinear,
    check_weight_format,
)
from .targets import (
    CompressionError,
    output_head,
    quantization_targets,
    replace_module,
)

QUANTIZATION_METHODS = ("rtn", "gptq", "gguf")
SECTION_KEYS = ("weights", "group_size", "method", "modules", "rounded_to_nearest", "formats")


def check_quantization_args(weights: str, group_size: int | None) -> None:
    """A CompressionError naming the argument unless (weights, group_size) is a format
    quantize_model writes: int8 per channel (group_size None), int4 in groups of 32/64/128."""
    if weights not in WEIGHT_FORMATS:
        raise CompressionError("weights", weights, f"allowed: {', '.join(WEIGHT_FORMATS)}")
    if weights == "int8" and group_size is not None:
        raise CompressionError("group_size", group_size,
                               "int8 is per output channel; group_size applies to int4")
    if weights == "int4" and group_size not in INT4_GROUP_SIZES:
        raise CompressionError("group_size", group_size,
                               f"int4 takes {', '.join(map(str, INT4_GROUP_SIZES))}")


@torch.no_grad()
def quantize_model(model: nn.Module, weights: str = "int8", group_size: int | None = None,
                   skip: Iterable[str] = (), *, method: str = "rtn",
                   calibration: torch.Tensor | None = None) -> dict[str, Any]:
    """Replace every linear layer compression takes (`linear_targets`: mixers, FFNs, the output
    head) by a QuantizedLinear, in place; returns the config section and sets it as
    `model.config.quantization` where the model has a config. `method`: "rtn" rounds to nearest;
    "gptq" (compression/gptq.py) needs `calibration` token ids (B, T) (zoo compress takes them
    from the default corpus's training split) and runs block by block over them.

    A tied output head is untied (config.tie_word_embeddings = False): the head becomes int8 or
    int4 codes and the embedding stays a float table, of which decoding reads one row a token.
    Every layer is checked before any is replaced: int4 with a group size that does not divide a
    layer's input width is a CompressionError naming group_size and the layer; so are an
    unknown method and gptq without calibration.
    """
    check_quantization_args(weights, group_size)
    if method not in QUANTIZATION_METHODS:
        raise CompressionError("method", method, f"allowed: {', '.join(QUANTIZATION_METHODS)}")
    if method == "gptq":
        check_calibration(calibration, method)
    targets = quantization_targets(model, skip, weights)
    config = getattr(model, "config", None)
    for name, linear in targets:
        if group_size is not None and linear.in_features % group_size:
            raise CompressionError(
                "group_size", group_size, f"does not divide the input width "
                f"{linear.in_features} of {name}; pick one that does, or leave such layers "
                f"float (skip '*.{name.rpartition('.')[2]}')")
    head = output_head(model)
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = (isinstance(head, nn.Linear) and embedding is not None
            and head.weight is embedding.weight)
    rounded: dict[str, str] = {}
    if method == "gptq":
        rounded = gptq_quantize_layers(model, targets, weights, group_size, calibration)
    else:
        for name, linear in targets:
            replace_module(model, name, QuantizedLinear.from_linear(linear, weights, group_size))
    section = {"weights": weights, "group_size": group_size, "method": method,
               "modules": [name for name, _ in targets]}
    if rounded:
        section["rounded_to_nearest"] = [name for name, _ in targets if name in rounded]
    if config is not None:
        if tied and any(module is head for _, module in targets):
            config.tie_word_embeddings = False
            if hasattr(model, "get_expanded_tied_weights_keys"):
                # transformers reads this mapping when saving and loading
                model.all_tied_weights_keys = model.get_expanded_tied_weights_keys()
        config.quantization = section
    return section


def check_quantization_section(section: Any, where: str = "quantization") -> None:
    """A ValueError naming the field unless `section` is a config section quantize_model
    writes (module doc)."""
    if not isinstance(section, Mapping):
        raise ValueError(f"{where} must be a mapping with keys {', '.join(SECTION_KEYS)}, "
                         f"got {section!r}")
    unknown = [key for key in section if key not in SECTION_KEYS]
    if unknown:
        raise ValueError(f"{where} has unknown key {unknown[0]!r}; "
                         f"allowed: {', '.join(SECTION_KEYS)}")
    if section.get("method") not in QUANTIZATION_METHODS:
        raise ValueError(f"{where}.method={section.get('method')!r} is not one of "
                         f"{QUANTIZATION_METHODS}")
    if section["method"] == "gguf":
        check_weight_format(section.get("weights"), section.get("group_size"), where=where)
    else:
        try:
            check_quantization_args(section.get("weights"), section.get("group_size"))
        except CompressionError as error:
            raise ValueError(f"{where}.{error.option}={error.value!r}: {error.detail}") from None
    modules = section.get("modules")
    if not isinstance(modules, list) or not modules or not all(
            isinstance(name, str) and name for name in modules):
        raise ValueError(f"{where}.modules must be a non-empty list of module names, "
                         f"got {modules!r}")
    rounded = section.get("rounded_to_nearest", [])
    if not isinstance(rounded, list) or not all(name in modules for name in rounded):
        raise ValueError(f"{where}.rounded_to_nearest must be a list of names from "
                         f"{where}.modules, got {rounded!r}")
    formats = section.get("formats", {})
    if formats and section["method"] != "gguf":
        raise ValueError(f"{where}.formats: method {section['method']!r} stores every layer "
                         "in the section's one format")
    if not isinstance(formats, Mapping):
        raise ValueError(f"{where}.formats must map module names to {{weights, group_size}}")
    for name, layer in formats.items():
        if name not in modules:
            raise ValueError(f"{where}.formats names {name!r}, which {where}.modules lacks")
        if not isinstance(layer, Mapping) or set(layer) != {"weights", "group_size"}:
            raise ValueError(f"{where}.formats[{name!r}] must be {{weights, group_size}}, "
                             f"got {layer!r}")
        check_weight_format(layer["weights"], layer["group_size"], where=f"{where}.formats")


def layer_format(section: Mapping[str, Any], name: str) -> tuple[str, int | None]:
    """(weights, group_size) of the layer `name` of a quantization section."""
    layer = section.get("formats", {}).get(name, section)
    return layer["weights"], layer["group_size"]


def apply_quantized_layout(model: nn.Module, section: Mapping[str, Any]) -> None:
    """Replace the linear layers the section names by empty QuantizedLinear layers of the same
    shapes, device and dtype, ready for their saved tensors (what from_pretrained loads into).
    A name that is not a linear layer of this model is a ValueError naming it."""
    check_quantization_section(section)
    for name in section["modules"]:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"quantization.modules names {name!r}, which is not a linear "
                             "layer of this model")
        weights, group_size = layer_format(section, name)
        replace_module(model, name, QuantizedLinear(
            linear.in_features, linear.out_features, linear.bias is not None,
            weights=weights, group_size=group_size,
            device=linear.weight.device, dtype=linear.weight.dtype))


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantizedLinear]]:
    """(name, module) of every QuantizedLinear in the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def prepare_kernels(model: nn.Module, dtype: torch.dtype) -> None:
    """Build what every QuantizedLinear's CPU kernel needs for `dtype` activations (before a
    compiled step traces the model)."""
    for _, module in quantized_layers(model):
        module.prepare_kernels(dtype)
