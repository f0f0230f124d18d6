"""The native step's integer products (kernels/transformer_step/int8_dots.h): the input quantised
to int8 in blocks of 32 (scale max|x| / 127, round half to even) and dotted with int8 or int4
codes by AVX-512 VNNI equal dequantise(W) . dequantise(quantise(x)) computed in float64, to
float32 rounding; against the float path they differ by at most the activations' rounding."""

import pytest
import torch

from zoo.kernels import transformer_step

BLOCK = 32


def _load():
    if not transformer_step.load():
        pytest.skip("the C++ transformer step did not build on this machine")
    return torch.ops.zoo_cpu


def _integer_path(ops):
    if not ops.int8_dots(None):
        pytest.skip("this build or CPU has no AVX-512 VNNI: the float path is the only one")


@pytest.fixture
def ops():
    """The kernel's ops, with the integer path's setting restored after each test."""
    ops = _load()
    before = ops.int8_dots(None)
    yield ops
    ops.int8_dots(before)


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """The kernel's activation quantisation, dequantised: blocks of 32, scale = max|x| / 127,
    codes round(x * (127 / max|x|)) half to even, all in float32 as the kernel computes them."""
    blocks = x.float().view(x.shape[0], -1, BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    codes = torch.round(blocks * inverse)
    return (codes.double() * (amax / 127).double()).view_as(x)


def dequantize(codes, scale, zero):
    """Float64 weights (N, K) of int8 codes (N, K) or int4 codes two a byte (N, K / 2: input 2j
    in the low nibble) with scale (and zero) per group."""
    if codes.dtype == torch.uint8:
        values = torch.stack([codes & 15, codes >> 4], dim=-1).flatten(1).double()
    else:
        values = codes.double()
    group = values.shape[1] // scale.shape[1]
    weights = values * scale.double().repeat_interleave(group, dim=1)
    if zero is not None:
        weights = weights + zero.double().repeat_interleave(group, dim=1)
    return weights


def _case(int4, n, k, group, dtype, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    if int4:
        codes = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    else:  # -128 too: the unsigned offset must be exact at both ends
        codes = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, k // group, generator=g) * 0.02 + 0.001).to(dtype)
    zero = (torch.randn(n, k // group, generator=g) * 0.05).to(dtype) if int4 else None
    x = torch.randn(batch, k, generator=g) * torch.rand(batch, k, generator=g) * 3
    x[0, :BLOCK] = 0  # a block of zeros: scale 0, codes 0
    return x, codes, scale, zero


# (int4, K, group): per channel, groups of 32 / 64 / 128, and K that leaves a short last chunk
CASES = [
    (False, 576, 576), (False, 96, 96), (False, 576, 32), (False, 96, 32), (False, 256, 128),
    (True, 576, 32), (True, 576, 64), (True, 96, 32), (True, 256, 128), (True, 512, 256),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("int4,k,group", CASES)
def test_integer_products_equal_their_definition(ops, int4, k, group, dtype):
    _integer_path(ops)
    for batch in (1, 3, 6):  # one, a partial and a full pass of four inputs plus a rest
        x, codes, scale, zero = _case(int4, 40, k, group, dtype, batch, seed=k + batch)
        got = ops.quantized_matmul(x, codes, scale, zero)
        weights = dequantize(codes, scale, zero)
        x_dequantized = quantize_activations(x)
        expected = x_dequantized @ weights.T
        # float32 sums of exact int32 block dots: rounding of order 1e-7 of the magnitudes
        magnitude = x_dequantized.abs() @ weights.abs().T
        assert ((got.double() - expected).abs() <= 2e-6 * magnitude + 1e-9).all(), (
            int4, k, group, dtype, batch, (got.double() - expected).abs().max().item())


@pytest.mark.parametrize("int4,k,group", [(False, 576, 576), (False, 576, 32), (True, 576, 32)])
def test_integer_and_float_paths_differ_by_the_activation_rounding(ops, int4, k, group):
    """Each input moves by at most half its block's step (max|x| / 254), so a product moves by
    at most sum_i |w_i| * step_i / 2; the float path (switched off integer path) is exact."""
    _integer_path(ops)
    x, codes, scale, zero = _case(int4, 64, k, group, torch.bfloat16, 2)
    weights = dequantize(codes, scale, zero)
    integer = ops.quantized_matmul(x, codes, scale, zero)
    assert ops.int8_dots(False)
    assert not ops.int8_dots(None)
    floats = ops.quantized_matmul(x, codes, scale, zero)
    exact = x.double() @ weights.T
    magnitude = x.double().abs() @ weights.abs().T
    assert ((floats.double() - exact).abs() <= 2e-6 * magnitude + 1e-9).all()
    half_steps = x.abs().view(2, -1, BLOCK).amax(-1).repeat_interleave(BLOCK, 1).double() / 254
    bound = half_steps @ weights.abs().T + 2e-6 * magnitude
    difference = (integer.double() - exact).abs()
    assert (difference <= bound).all()
    assert difference.max() > 0  # the integer path did quantise the input


def test_int4_zero_term_uses_the_dequantised_input_sum(ops):
    """All codes 0: each weight is its group's zero, so the product is sum_g zero_g * (sum of
    the dequantised inputs of g), not of the float inputs."""
    _integer_path(ops)
    k, group = 128, 32
    codes = torch.zeros(3, k // 2, dtype=torch.uint8)
    scale = torch.full((3, k // group), 0.5)
    zero = torch.tensor([[1.0, -2.0, 0.25, 3.0]] * 3)
    x = torch.linspace(-1, 1, k).view(1, k) ** 3
    got = ops.quantized_matmul(x, codes, scale, zero)
    x_dequantized = quantize_activations(x).view(1, k // group, group).sum(-1)
    expected = (x_dequantized * zero[0].double()).sum()
    torch.testing.assert_close(got.double(), expected.expand(1, 3), rtol=1e-6, atol=1e-7)


def test_quantized_matmul_names_bad_arguments(ops):
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="codes must be contiguous int8"):
        ops.quantized_matmul(x, torch.zeros(4, 32, dtype=torch.int8), torch.ones(4, 1), None)
    with pytest.raises(RuntimeError, match="int4 codes take a zero"):
        ops.quantized_matmul(x, torch.zeros(4, 32, dtype=torch.uint8), torch.ones(4, 2), None)
