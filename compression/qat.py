"""Quantisation-aware training: fake-quantised weights with a straight-through estimator.

    fake_quantize_model(model, "int4", group_size=32)   # every linear compression takes
    ... train: each forward uses round-to-nearest int4 weights, the gradient reaches the floats
    quantize_model(model, "int4", 32)                    # the real codes, the same weights

A `FakeQuantLinear` is an `nn.Linear` (the same parameters and state-dict names, so checkpoints,
resuming and `save_pretrained` see a float model) whose forward uses `fake_quantize(weight)`:
the weight `QuantizedLinear.from_linear` would store, dequantised with the same arithmetic, so
`quantize_model` with the same settings gives codes whose dequantised weights equal the
fake-quantised ones exactly. The backward is the straight-through estimator (Bengio et al. 2013;
the QAT of Jacob et al. 2018): rounding's derivative, zero almost everywhere, is taken as 1, so
the float weight gets the gradient the layer's weight would get at the fake-quantised value.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .quantize import check_quantization_args
from .quantized_linear import quantize_int4, quantize_int8, unpack_int4
from .targets import CompressionError, linear_targets, replace_module


def fake_quantize(weight: torch.Tensor, weights: str, group_size: int | None) -> torch.Tensor:
    """The weight (out, in) round-to-nearest codes in this format stand for, in weight's dtype;
    equal to `QuantizedLinear.from_linear(...).dequantize(weight.dtype)` (no gradient)."""
    with torch.no_grad():
        out_features, in_features = weight.shape
        if weights == "int8":
            codes, scale = quantize_int8(weight, group_size)
            zero = None
        else:
            packed, scale, zero = quantize_int4(weight, group_size)
            codes = unpack_int4(packed)
        # QuantizedLinear.dequantize's arithmetic, step for step: float32 (float64 scales:
        # float64), times the scale, plus the zero, then the weight's dtype
        compute = torch.float64 if scale.dtype == torch.float64 else torch.float32
        group = in_features if group_size is None else group_size
        result = codes.to(compute).view(out_features, -1, group)
        result.mul_(scale.to(compute)[..., None])
        if zero is not None:
            result.add_(zero.to(compute)[..., None])
        return result.view(out_features, in_features).to(weight.dtype)


class _StraightThrough(torch.autograd.Function):
    """fake_quantize forward, identity backward (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, weights: str, group_size: int | None) -> torch.Tensor:
        return fake_quantize(weight, weights, group_size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


def fake_quantize_ste(weight: torch.Tensor, weights: str, group_size: int | None
                      ) -> torch.Tensor:
    """`fake_quantize(weight)` whose gradient passes to `weight` unchanged."""
    return _StraightThrough.apply(weight, weights, group_size)


class FakeQuantLinear(nn.Linear):
    """An nn.Linear whose forward uses its fake-quantised weight (module doc); `weight` stays
    the float parameter the optimizer updates."""

    weights: str = "int8"
    group_size: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quantize_ste(self.weight, self.weights, self.group_size),
                        self.bias)

    def extra_repr(self) -> str:
        grouping = "per channel" if self.group_size is None else f"groups of {self.group_size}"
        return f"{super().extra_repr()}, fake {self.weights} ({grouping})"


def fake_quantize_model(model: nn.Module, weights: str, group_size: int | None = None,
                        skip: Iterable[str] = ()) -> dict[str, Any]:
    """Make every linear layer `quantize_model` would quantise (`linear_targets`) a
    FakeQuantLinear in this format, in place, keeping its parameters (a tied head stays tied:
    its forward reads the fake-quantised table, the embedding the float one, as after
    quantize_model). Formats and errors are quantize_model's (int8 per output channel, int4 in
    groups of 32 / 64 / 128 dividing every layer's input); returns {"weights", "group_size",
    "modules"}."""
    check_quantization_args(weights, group_size)
    targets = linear_targets(model, skip)
    if not targets:
        raise CompressionError("weights", weights, "the model has no linear layer to quantise")
    for name, linear in targets:
        if isinstance(linear, FakeQuantLinear):
            raise CompressionError("weights", weights, f"{name} is fake-quantised already")
        if group_size is not None and linear.in_features % group_size:
            raise CompressionError("group_size", group_size, f"does not divide the input width "
                                   f"{linear.in_features} of {name}")
    for name, linear in targets:
        fake = FakeQuantLinear(linear.in_features, linear.out_features, bias=False,
                               device="meta")
        # the same Parameter objects: a tied head stays tied, an optimizer's state still fits
        fake.weight, fake.bias = linear.weight, linear.bias
        fake.weights, fake.group_size = weights, group_size
        replace_module(model, name, fake)
    return {"weights": weights, "group_size": group_size, "modules": [n for n, _ in targets]}
