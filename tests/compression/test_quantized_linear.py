"""QuantizedLinear: its codes are round-to-nearest, its forward equals the product with its own
dequantised weight (on torch's CPU kernels and on the dequantising path), int4 packing is
lossless, and the repacked int4 codes follow changes of the stored ones."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zoo.compression import QuantizedLinear, pack_int4, quantize_int4, quantize_int8, unpack_int4
from zoo.testing import assert_close

FORMATS = [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)]


def _linear(in_features=128, out_features=96, bias=True, dtype=torch.float32) -> nn.Linear:
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        # uneven rows and groups, as trained weights have
        linear.weight.mul_(torch.logspace(-1, 1, out_features)[:, None])
    return linear.to(dtype)


def _reference(module: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """x @ dequantised(W).T + b in float64: the product every path must equal."""
    weight = module.dequantize(torch.float64)
    bias = None if module.bias is None else module.bias.double()
    return F.linear(x.double(), weight, bias)


class _Calls:
    """Counts the calls of one aten op (to see which path a forward took)."""

    def __init__(self, monkeypatch, name: str):
        self.count, op = 0, getattr(torch.ops.aten, name)

        def counted(*args):
            self.count += 1
            return op(*args)

        monkeypatch.setattr(torch.ops.aten, name, counted)


def test_int4_packing_round_trips_and_puts_even_columns_in_the_low_nibble():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    assert torch.equal(packed[:, 0] & 0x0F, codes[:, 0])
    assert torch.equal(packed[:, 0] >> 4, codes[:, 1])
    every_value = torch.arange(16, dtype=torch.uint8).repeat(2)[None]
    assert torch.equal(unpack_int4(pack_int4(every_value)), every_value)


@pytest.mark.parametrize(("weights", "group_size"), FORMATS)
@pytest.mark.parametrize("pruned", [False, True])
def test_codes_are_the_nearest_for_the_stored_scales(weights, group_size, pruned):
    weight = _linear(bias=False).weight.detach().clone()
    if pruned:  # int4 groups holding a zero take a grid through 0
        weight.view(96, -1, 4)[..., :2] = 0
    rows, width = weight.shape
    group = width if group_size is None else group_size
    if weights == "int8":
        codes, scale = quantize_int8(weight, group_size)
        assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 127
        zero = torch.zeros_like(scale)
        codes = codes.double()
    else:
        packed, scale, zero = quantize_int4(weight, group_size)
        codes = unpack_int4(packed).double()
        assert int(codes.max()) <= 15
    assert scale.shape == (rows, width // group)
    scale, zero = scale.double()[..., None], zero.double()[..., None]
    grouped = weight.double().view(rows, -1, group)
    dequantised = codes.view(rows, -1, group) * scale + zero
    # round to nearest: every weight within half a step of what its code stands for
    assert ((grouped - dequantised).abs() <= scale / 2 * (1 + 1e-6)).all()


def test_weights_on_gguf_q4_1_grids_keep_their_codes():
    """SmolLM2 ships as Q4_1 (w = d * q + m per 32 weights, d and m float16): re-quantised to
    int4 in groups of 32, it keeps its codes, where a grid forced through 0 would round anew."""
    rows, groups = 8, 4
    q = torch.randint(0, 16, (rows, groups, 32))
    q[..., 0], q[..., 1] = 0, 15  # every Q4_1 block holds its minimum and its maximum
    d = (torch.rand(rows, groups, 1) * 0.01 + 1e-3).half().float()
    m = (-torch.rand(rows, groups, 1) * 0.1).half().float()
    weight = (q * d + m).view(rows, groups * 32)
    packed, scale, zero = quantize_int4(weight, 32)
    assert torch.equal(unpack_int4(packed).view(rows, groups, 32), q.to(torch.uint8))
    module = QuantizedLinear.from_linear(_as_linear(weight), "int4", 32)
    assert_close("w", weight, module.dequantize(), 1e-6)


def test_a_group_of_zeros_quantises_to_zeros():
    weight = torch.zeros(16, 64)
    weight[:, 32:] = torch.randn(16, 32)
    for weights, group_size in (("int8", 32), ("int4", 32)):
        module = QuantizedLinear.from_linear(_as_linear(weight), weights, group_size)
        assert torch.equal(module.dequantize()[:, :32], torch.zeros(16, 32))
        assert torch.isfinite(module.scale).all()


@pytest.mark.parametrize(("weights", "group_size"), FORMATS)
def test_pruned_weights_stay_exactly_zero(weights, group_size):
    """0 has a code of its own (int4: an integer zero point), so a 2:4 pattern survives."""
    weight = _linear(bias=False).weight.detach().clone()
    weight.view(96, -1, 4)[..., :2] = 0
    dequantised = QuantizedLinear.from_linear(_as_linear(weight), weights, group_size).dequantize()
    assert (dequantised[weight == 0] == 0).all()


def _as_linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


@pytest.mark.parametrize(("weights", "group_size"), FORMATS)
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 64, 80])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_the_dequantised_product_in_float32(weights, group_size, rows, bias):
    module = QuantizedLinear.from_linear(_linear(bias=bias), weights, group_size)
    x = torch.randn(rows, 128)
    assert_close("y", _reference(module, x), module(x), 1e-6)
    # and the layer's weight, as code that reads it directly sees it
    assert torch.equal(module.weight, module.dequantize())


@pytest.mark.parametrize(("weights", "group_size"), FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_few_rows_in_half_precision_run_torch_kernels_and_equal_the_product(
        monkeypatch, weights, group_size, dtype):
    op = "_weight_int8pack_mm" if weights == "int8" else "_weight_int4pack_mm_for_cpu"
    calls = _Calls(monkeypatch, op)
    module = QuantizedLinear.from_linear(_linear(dtype=dtype), weights, group_size)
    x = torch.randn(2, 3, 128).to(dtype)
    y = module(x)
    assert calls.count == 1, f"{op} did not run"
    assert y.dtype == dtype and y.shape == (2, 3, 96)
    # the kernel rounds its output (and int4's zero point) to half precision: a few units of
    # the last place, against 2**-8 = 4e-3 for one bf16 rounding
    assert_close("y", _reference(module, x), y, 1.5e-2)


@pytest.mark.parametrize(("weights", "group_size"), [("int8", None), ("int4", 32)])
def test_prefill_sized_inputs_and_inputs_needing_gradients_take_the_dequantised_product(
        monkeypatch, weights, group_size):
    op = "_weight_int8pack_mm" if weights == "int8" else "_weight_int4pack_mm_for_cpu"
    calls = _Calls(monkeypatch, op)
    module = QuantizedLinear.from_linear(_linear(dtype=torch.bfloat16), weights, group_size)
    x = torch.randn(80, 128, dtype=torch.bfloat16)
    assert torch.equal(module(x), F.linear(x, module.dequantize(torch.bfloat16), module.bias))
    few = torch.randn(2, 128, dtype=torch.bfloat16, requires_grad=True)
    module(few).sum().backward()
    assert calls.count == 0
    assert few.grad is not None and module.qweight.grad is None


def test_gradient_reaches_the_input_and_the_bias_not_the_codes():
    module = QuantizedLinear.from_linear(_linear(), "int4", 32)
    x = torch.randn(4, 128, requires_grad=True)
    module(x).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    F.linear(x_ref, module.dequantize(), module.bias.detach()).square().sum().backward()
    assert_close("dx", x_ref.grad, x.grad, 1e-6)
    assert module.bias.grad is not None
    assert not module.qweight.requires_grad and not module.scale.requires_grad


def test_int8_widths_the_kernel_mishandles_take_the_dequantised_product(monkeypatch):
    """torch's int8 kernel segfaults or returns garbage for input widths such as 48 or 63."""
    calls = _Calls(monkeypatch, "_weight_int8pack_mm")
    module = QuantizedLinear.from_linear(_linear(in_features=48, dtype=torch.bfloat16), "int8")
    x = torch.randn(1, 48, dtype=torch.bfloat16)
    assert_close("y", _reference(module, x), module(x), 1e-2)
    assert calls.count == 0


def test_int4_output_widths_the_kernel_refuses_take_the_dequantised_product(monkeypatch):
    calls = _Calls(monkeypatch, "_weight_int4pack_mm_for_cpu")
    module = QuantizedLinear.from_linear(_linear(out_features=4, dtype=torch.bfloat16), "int4", 32)
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    assert_close("y", _reference(module, x), module(x), 1e-2)
    assert calls.count == 0


def test_grouped_int8_equals_its_dequantised_product():
    """int8 in groups along the input (GGUF's Q8_0 layout) is a format the layer holds."""
    module = QuantizedLinear.from_linear(_linear(), "int8", 32)
    assert module.scale.shape == (96, 4)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 128).to(dtype)
        assert_close(f"y {dtype}", _reference(module.to(dtype), x), module(x), 1e-2)


def test_repacked_int4_codes_follow_an_in_place_change_of_the_stored_ones():
    module = QuantizedLinear.from_linear(_linear(dtype=torch.bfloat16), "int4", 32)
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    before = module(x)
    other = QuantizedLinear.from_linear(_linear(dtype=torch.bfloat16), "int4", 32)
    with torch.no_grad():  # what load_state_dict does
        module.qweight.copy_(other.qweight)
        module.scale.copy_(other.scale)
        module.zero.copy_(other.zero)
        module.bias.copy_(other.bias)
    after = module(x)
    assert not torch.equal(before, after)
    assert torch.equal(after, other(x))


def test_to_dtype_keeps_the_codes_and_casts_the_scales():
    module = QuantizedLinear.from_linear(_linear(), "int4", 32)
    codes = module.qweight.clone()
    module = module.to(torch.bfloat16)
    assert torch.equal(module.qweight, codes) and module.qweight.dtype == torch.uint8
    assert module.scale.dtype == module.zero.dtype == module.bias.dtype == torch.bfloat16


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"weights": "int3"}, r"weights='int3' is not one of \('int8', 'int4'\)"),
    ({"weights": "int4"}, r"int4 needs a group_size"),
    ({"weights": "int4", "group_size": 48}, r"group_size=48 does not divide the input width 64"),
    ({"weights": "int4", "group_size": 7}, r"group_size=7 must be a positive even integer"),
])
def test_bad_formats_are_errors_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantizedLinear(64, 32, **kwargs)
