"""`QuantizedLinear`: a weight-only quantised linear layer (int8 or int4 codes with float scales)
that a zoo model holds where it held an `nn.Linear`, the output head included.

Stored tensors (the safetensors layout `save_pretrained` writes, per module):

    qweight  int8  (out, in)       int8: codes in [-127, 127]; W = qweight * scale
             uint8 (out, in / 2)   int4: two codes in [0, 15] per byte, input column 2j in the
                                   low nibble and 2j + 1 in the high one; W = q * scale + zero
    scale    float (out, in / group_size)   one per group of `group_size` inputs of a row
                                            (per output channel: one column, group = in)
    zero     float (out, in / group_size)   int4 only: the weight the code 0 stands for
                                            (GGUF Q4_1's "m"; Q4_0 is zero = -8 * scale)
    bias     float (out,)                    as nn.Linear's

Float tensors follow the model's dtype through `.to()`. `weight` (a property) is the dequantised
matrix, so code that reads a layer's weight directly still gets the right values; the layer's
own forward never builds it where a kernel applies.

Forward equals `F.linear(x, dequantize(x.dtype), bias)` up to summation order. On the CPU, few
rows (decoding; up to 16 for int8, 64 for int4) in bfloat16 or float16 run torch's weight-only
kernels, which read the codes and dequantise in registers: `aten._weight_int8pack_mm`
(per-channel int8) and `aten._weight_int4pack_mm_for_cpu` (int4, after a one-time repacking into
its own layout, kept beside the stored codes). Every other case (float32 activations, whose
torch kernels run a scalar loop slower than dequantising; prefill-sized inputs; CUDA; shapes a
kernel refuses; inputs that need a gradient) dequantises the weight and calls F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_FORMATS = ("int8", "int4")
# group sizes torch's CPU int4 kernel takes; they also divide every zoo layer width of 64 and up
INT4_GROUP_SIZES = (32, 64, 128)
INT8_MAX, INT4_MAX = 127, 15
# activation dtypes torch's CPU weight-only kernels vectorise (float32 takes a scalar loop)
KERNEL_DTYPES = (torch.bfloat16, torch.float16)
# beyond this many rows dequantising once and calling BLAS wins (torch's weight-only kernels
# cost in proportion to the rows; measured at SmolLM2's widths, bf16, 2 threads)
KERNEL_MAX_ROWS = {"int8": 16, "int4": 64}
# input widths the int8 kernel handles: it segfaults or returns garbage on widths like 8 or 63
INT8_KERNEL_WIDTH_MULTIPLE = 32
# torch's CPU int4 repacking takes output widths that are multiples of 16
INT4_KERNEL_OUT_MULTIPLE = 16


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes (..., K) in [0, 15], K even -> uint8 (..., K / 2): column 2j low nibble, 2j+1 high."""
    codes = codes.to(torch.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (..., K / 2) -> codes uint8 (..., K) in [0, 15]; the inverse of `pack_int4`."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def quantize_int8(weight: torch.Tensor, group_size: int | None = None,
                  scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Round to nearest, symmetric: (codes int8 (out, in), scale (out, groups)), one scale per
    group of `group_size` inputs of a row (None: per output channel). A group of zeros gets
    scale 1 (its codes are 0). The scale is rounded to `scale_dtype` before the codes are
    chosen, so the codes are the nearest ones for the scale that is stored."""
    out_features, in_features = weight.shape
    group = in_features if group_size is None else group_size
    w = weight.detach().to(_compute_dtype(weight.dtype)).view(out_features, -1, group)
    bound = w.abs().amax(dim=-1)
    scale = torch.where(bound > 0, bound / INT8_MAX, torch.ones_like(bound))
    scale = scale.to(scale_dtype or weight.dtype)
    codes = torch.round(w / scale.to(w.dtype)[..., None]).clamp(-INT8_MAX, INT8_MAX)
    return codes.to(torch.int8).view(out_features, in_features), scale


def quantize_int4(weight: torch.Tensor, group_size: int, scale_dtype: torch.dtype | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round to nearest, asymmetric per group of `group_size` inputs of a row: (packed uint8
    (out, in / 2), scale (out, groups), zero (out, groups)), codes round((w - zero) / scale).

    A group spans its own range, zero = its minimum and scale = its range / 15 (GGUF's Q4_1
    grid, so weights imported from a Q4_1 file keep their codes, and their values to float32's
    rounding). A group that holds an exact
    zero (a pruned weight) spans [min(w, 0), max(w, 0)] with an integer zero point zp, zero =
    -zp * scale, as GPTQ's quantiser does: 0 has a code of its own and pruned weights stay zero
    (exactly with float32 scales, within a rounding of a half-precision zero otherwise). A
    constant group gets scale 1. Scale and zero are rounded to `scale_dtype` first, as in
    `quantize_int8`."""
    out_features, in_features = weight.shape
    compute = _compute_dtype(weight.dtype)
    w = weight.detach().to(compute).view(out_features, -1, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    holds_zero = (w == 0).any(dim=-1)
    low = torch.where(holds_zero, low.clamp(max=0), low)
    high = torch.where(holds_zero, high.clamp(min=0), high)
    scale = torch.where(high > low, (high - low) / INT4_MAX, torch.ones_like(low))
    scale = scale.to(scale_dtype or weight.dtype)
    step = scale.to(compute)
    zero_point = torch.round(-low / step).clamp(0, INT4_MAX)
    zero = torch.where(holds_zero, -zero_point * step, low).to(scale.dtype)
    codes = torch.round((w - zero.to(compute)[..., None]) / step[..., None]).clamp(0, INT4_MAX)
    return pack_int4(codes.view(out_features, in_features)), scale, zero


def check_weight_format(weights: str, group_size: int | None, in_features: int | None = None,
                        where: str = "QuantizedLinear") -> None:
    """A ValueError naming the argument unless (weights, group_size) is a format this layer
    stores and, given in_features, one that fits a layer that wide."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"{where}: weights={weights!r} is not one of {WEIGHT_FORMATS}")
    if weights == "int4" and group_size is None:
        raise ValueError(f"{where}: int4 needs a group_size, one of {INT4_GROUP_SIZES}")
    if group_size is not None and (not isinstance(group_size, int) or isinstance(
            group_size, bool) or group_size < 1 or group_size % 2):
        raise ValueError(f"{where}: group_size={group_size!r} must be a positive even integer "
                         f"(int4: one of {INT4_GROUP_SIZES})")
    if in_features is not None and group_size is not None and in_features % group_size:
        raise ValueError(f"{where}: group_size={group_size} does not divide the input width "
                         f"{in_features}")


class QuantizedLinear(nn.Module):
    """Weight-only int8 / int4 linear layer; x (..., in) -> (..., out). See the module doc for
    the stored tensors. Build one with `from_linear` (round to nearest), or empty with the
    constructor (to load saved tensors into)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 weights: str = "int8", group_size: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        check_weight_format(weights, group_size, in_features)
        self.in_features, self.out_features = in_features, out_features
        self.weights, self.group_size = weights, group_size
        groups = 1 if group_size is None else in_features // group_size
        if weights == "int8":
            codes = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        else:
            codes = torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
        # Parameters that take no gradient: counted by model.parameters() (weight bytes, device
        # moves) and loaded strictly by name, never touched by an optimizer
        self.qweight = nn.Parameter(codes, requires_grad=False)
        self.scale = nn.Parameter(
            torch.ones(out_features, groups, device=device, dtype=dtype), requires_grad=False)
        if weights == "int4":
            self.zero = nn.Parameter(
                torch.zeros(out_features, groups, device=device, dtype=dtype),
                requires_grad=False)
        else:
            self.register_parameter("zero", None)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        # (what it was built from, (repacked codes, scales and zeros)) for the CPU int4 kernel
        self._int4_kernel_cache: tuple | None = None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, weights: str = "int8",
                    group_size: int | None = None) -> QuantizedLinear:
        """`linear` rounded to nearest in the given format (scales in its weight's dtype)."""
        weight = linear.weight
        module = cls(linear.in_features, linear.out_features, linear.bias is not None,
                     weights=weights, group_size=group_size, device=weight.device,
                     dtype=weight.dtype)
        if weights == "int8":
            codes, scale = quantize_int8(weight, group_size)
        else:
            codes, scale, zero = quantize_int4(weight, group_size)
            module.zero.copy_(zero)
        module.qweight.copy_(codes)
        module.scale.copy_(scale)
        if linear.bias is not None:
            module.bias.copy_(linear.bias)
        return module

    @property
    def group(self) -> int:
        """Inputs per scale: group_size, or in_features for per-channel int8."""
        return self.in_features if self.group_size is None else self.group_size

    def codes(self) -> torch.Tensor:
        """The integer codes (out, in): int8 for int8, uint8 in [0, 15] for int4."""
        return self.qweight if self.weights == "int8" else unpack_int4(self.qweight)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight (out, in) the codes stand for, computed in float32 (float64 for float64
        scales) and returned in `dtype` (default: the scales' dtype)."""
        dtype = dtype or self.scale.dtype
        compute = _compute_dtype(self.scale.dtype)
        # in place on the one fresh tensor: a new weight-sized tensor per operation costs more
        # (page faults of fresh allocations) than the arithmetic
        weight = self.codes().to(compute).view(self.out_features, -1, self.group)
        weight.mul_(self.scale.to(compute)[..., None])
        if self.zero is not None:
            weight.add_(self.zero.to(compute)[..., None])
        return weight.view(self.out_features, self.in_features).to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight (out, in), for code that reads a layer's matrix directly."""
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel_applies(x):
            rows = x.reshape(-1, self.in_features)
            if self.weights == "int8":
                y = torch.ops.aten._weight_int8pack_mm(
                    rows.contiguous(), self.qweight, self.scale.view(-1).to(x.dtype))
            else:
                packed, scale_and_zero = self._int4_kernel_tensors(x.dtype)
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                    rows.contiguous(), packed, self.group_size, scale_and_zero)
            y = y.view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def _kernel_applies(self, x: torch.Tensor) -> bool:
        """Whether a torch weight-only CPU kernel takes this input (see the module doc)."""
        if x.device.type != "cpu" or x.dtype not in KERNEL_DTYPES or x.numel() == 0:
            return False
        if x.numel() > KERNEL_MAX_ROWS[self.weights] * self.in_features:
            return False
        if torch.is_grad_enabled() and x.requires_grad:
            return False  # the kernels have no backward; the dequantised product has
        if self.weights == "int8":
            return (self.group_size is None and self.in_features % INT8_KERNEL_WIDTH_MULTIPLE == 0
                    and self.qweight.is_contiguous())
        if self.out_features % INT4_KERNEL_OUT_MULTIPLE:
            return False
        # inside torch.compile the repacked codes must exist already (prepare_kernels): the
        # graph must not repack every step
        return not torch.compiler.is_compiling() or self._cached_int4(x.dtype) is not None

    def _int4_source(self, dtype: torch.dtype) -> tuple:
        """What the repacked kernel tensors were built from: a change in any means rebuild."""
        return (dtype, self.qweight.device, *((t.data_ptr(), t._version)
                                             for t in (self.qweight, self.scale, self.zero)))

    def _cached_int4(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        cached = self._int4_kernel_cache
        if cached is None or cached[0][0] != dtype:
            return None
        if not torch.compiler.is_compiling() and cached[0] != self._int4_source(dtype):
            return None
        return cached[1]

    @torch.no_grad()
    def _int4_kernel_tensors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes in torch's CPU int4 layout, scales and zeros (groups, out, 2) in `dtype`),
        built once per change of the stored tensors. torch's kernel dequantises
        (q - 8) * scale + zero', so zero' = zero + 8 * scale."""
        cached = self._cached_int4(dtype)
        if cached is not None:
            return cached
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            unpack_int4(self.qweight).to(torch.int32), 1)
        compute = _compute_dtype(self.scale.dtype)
        scale, zero = self.scale.to(compute), self.zero.to(compute)
        scale_and_zero = torch.stack([scale, zero + 8 * scale], dim=-1)
        tensors = (packed, scale_and_zero.transpose(0, 1).contiguous().to(dtype))
        self._int4_kernel_cache = (self._int4_source(dtype), tensors)
        return tensors

    def prepare_kernels(self, dtype: torch.dtype) -> None:
        """Build what the CPU kernels need for `dtype` activations now (a compiled step calls
        this before tracing, where building it would land in every step)."""
        if (self.weights == "int4" and self.qweight.device.type == "cpu"
                and dtype in KERNEL_DTYPES and self.out_features % INT4_KERNEL_OUT_MULTIPLE == 0):
            self._int4_kernel_tensors(dtype)

    def extra_repr(self) -> str:
        grouping = "per channel" if self.group_size is None else f"groups of {self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weights={self.weights} ({grouping})")

