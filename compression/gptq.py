"""GPTQ (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): int8 / int4 codes chosen column by column so that each column's
rounding error is made up for by the columns not yet quantised, through the Hessian
H = 2 XᵀX / n of the layer's calibration inputs.

Chosen over AWQ because its Hessian is the machinery SparseGPT (compression/sparsegpt.py) needs
as well, and because GPTQ is the calibrated int4 that GGUF-era formats are measured against.

Per linear layer, as the reference code (IST-DASLab/gptq) does: H dampened by 1% of its mean
diagonal, U the upper Cholesky factor of H⁻¹ (`inverse_hessian_factor`), columns visited left to
right in blocks of 128 with the updates to later blocks applied once per block ("lazy batch").
Column j is rounded on its group's grid, and its error (w_j - q_j) / U_jj is subtracted from the
later columns times U_j,j+1: (the OBS update). A group's grid (the int8 scale, the int4 scale and
zero, exactly as round to nearest computes them: `quantize_int8`, `quantize_int4`) is taken at
the group's first column from the group's current, error-updated weights. (The reference takes
it from the weights as they stood at the start of the 128-column block, which misses the updates
from the block's earlier columns; here the grid fits the values it rounds.) Per-channel int8 has
one group, the row, taken before any update. Columns are visited in their own order (no
act_order), so the stored layout is the one round to nearest writes and loading, saving and
decoding are unchanged.

A weight that is exactly zero before quantising (a pruned one) is quantised to zero and its
error fed forward like any other, so a pruned pattern survives GPTQ: pruning (SparseGPT) then
GPTQ is the two-step form of the paper's joint pruning and quantisation.
"""

from __future__ import annotations

import torch
from torch import nn

from .calibration import (
    DAMPENING,
    NEVER_RAN,
    InputHessians,
    check_calibration,
    inverse_hessian_factor,
    run_block_by_block,
)
from .quantized_linear import (
    INT4_MAX,
    INT8_MAX,
    QuantizedLinear,
    check_weight_format,
    pack_int4,
    quantize_int4,
    quantize_int8,
)
from .targets import output_head, replace_module

GPTQ_BLOCK_SIZE = 128


def _group_grid(current: torch.Tensor, weights: str, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale (out,), zero (out,) or None) of one group of columns `current` (out, g): what
    round to nearest computes for weights of `dtype` holding these values."""
    values = current.to(dtype)
    if weights == "int8":
        _, scale = quantize_int8(values)
        return scale[:, 0], None
    _, scale, zero = quantize_int4(values, values.shape[1])
    return scale[:, 0], zero[:, 0]


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, weights: str,
                  group_size: int | None, *, block_size: int = GPTQ_BLOCK_SIZE,
                  dampening: float = DAMPENING
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ codes of `weight` (out, in) in QuantizedLinear's format (module doc), computed in
    float64: (codes (out, in): int8 in [-127, 127] for int8, uint8 in [0, 15] for int4 (not
    packed), scale (out, in / group), zero (out, in / group) for int4 else None), scale and
    zero in the weight's dtype. `hessian`: H (in, in) of the layer's inputs."""
    out_features, in_features = weight.shape
    check_weight_format(weights, group_size, in_features, where="gptq_quantize")
    if weights == "int8" and group_size is not None:
        raise ValueError("gptq_quantize: int8 is per output channel; group_size applies to int4")
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}; a weight of input width "
                         f"{in_features} needs ({in_features}, {in_features})")
    group = in_features if group_size is None else group_size
    factor = inverse_hessian_factor(hessian, dampening)
    w = weight.detach().to(torch.float64).clone()
    pruned = weight.detach() == 0
    codes = torch.zeros(out_features, in_features, dtype=torch.int64, device=weight.device)
    scales = torch.zeros(out_features, in_features // group, dtype=weight.dtype,
                         device=weight.device)
    zeros = torch.zeros_like(scales) if weights == "int4" else None
    low, high = (-INT8_MAX, INT8_MAX) if weights == "int8" else (0, INT4_MAX)
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        block = w[:, start:end].clone()
        block_factor = factor[start:end, start:end]
        errors = torch.zeros_like(block)
        for i in range(end - start):
            column_index = start + i
            if column_index % group == 0:
                if i == 0:  # all earlier updates are applied at a block's start
                    current = w[:, column_index:column_index + group]
                elif i + group <= end - start:
                    current = block[:, i:i + group]
                else:
                    raise ValueError(f"gptq_quantize: group_size={group} straddles blocks of "
                                     f"{block_size} columns; use a divisor of {block_size}")
                mask = pruned[:, column_index:column_index + current.shape[1]]
                scale, zero = _group_grid(current.masked_fill(mask, 0), weights, weight.dtype)
                scales[:, column_index // group] = scale
                step = scale.to(torch.float64)
                offset = torch.zeros_like(step)
                if zero is not None:
                    zeros[:, column_index // group] = zero
                    offset = zero.to(torch.float64)
            column = block[:, i]
            target = column.masked_fill(pruned[:, column_index], 0)
            code = torch.round((target - offset) / step).clamp(low, high)
            value = code * step + offset
            codes[:, column_index] = code.to(torch.int64)
            error = (column - value) / block_factor[i, i]
            block[:, i + 1:] -= error[:, None] * block_factor[i, i + 1:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ factor[start:end, end:]
    return codes.to(torch.int8 if weights == "int8" else torch.uint8), scales, zeros


def quantized_linear_from_codes(linear: nn.Linear, weights: str, group_size: int | None,
                                codes: torch.Tensor, scale: torch.Tensor,
                                zero: torch.Tensor | None) -> QuantizedLinear:
    """A QuantizedLinear in `linear`'s place (its bias, device, dtype) holding these codes."""
    module = QuantizedLinear(linear.in_features, linear.out_features, linear.bias is not None,
                             weights=weights, group_size=group_size,
                             device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        module.qweight.copy_(codes if weights == "int8" else pack_int4(codes))
        module.scale.copy_(scale)
        if zero is not None:
            module.zero.copy_(zero)
        if linear.bias is not None:
            module.bias.copy_(linear.bias)
    return module


@torch.no_grad()
def gptq_quantize_layers(model: nn.Module, targets: list[tuple[str, nn.Linear]], weights: str,
                         group_size: int | None, calibration: torch.Tensor, *,
                         block_size: int = GPTQ_BLOCK_SIZE, dampening: float = DAMPENING
                         ) -> dict[str, str]:
    """Replace every target layer of `model` by its GPTQ QuantizedLinear, in place, block by
    block on `calibration` token ids (B, T) (compression.calibration: block i is calibrated on
    the outputs of the quantised blocks before it); the output head, when a target, last, on
    the backbone's output through all quantised blocks. A layer whose forward never runs (its
    weight read directly, e.g. Mamba's dt_proj) has no Hessian and is rounded to nearest.
    Returns those layers and why."""
    check_calibration(calibration, "gptq")
    head = output_head(model)
    in_blocks = [(name, linear) for name, linear in targets if linear is not head]
    hessians = InputHessians()
    rounded: dict[str, str] = {}

    def quantize(name: str, linear: nn.Linear, hessian: torch.Tensor | None) -> None:
        if hessian is None:
            rounded[name] = NEVER_RAN
            module = QuantizedLinear.from_linear(linear, weights, group_size)
        else:
            module = quantized_linear_from_codes(linear, weights, group_size, *gptq_quantize(
                linear.weight, hessian, weights, group_size, block_size=block_size,
                dampening=dampening))
        replace_module(model, name, module)

    def quantize_block(index: int, layers: list[tuple[str, nn.Linear]]) -> None:
        for name, linear in layers:
            quantize(name, linear, hessians.pop(name))

    hidden = run_block_by_block(model, in_blocks, calibration, hessians.add, quantize_block,
                                "gptq")
    for name, linear in targets:
        if linear is head:
            hessians.add(name, hidden.reshape(-1, hidden.shape[-1]))
            quantize(name, linear, hessians.pop(name))
    return rounded
