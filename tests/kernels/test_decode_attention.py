import importlib

import pytest
import torch

from zoo.kernels import decode_attention
from zoo.kernels.decode_attention import cpu
from zoo.testing import assert_close

# (B, H, H_kv, D, L): multi-head, grouped and multi-query heads; lengths that end inside a
# vector, a four-token unroll, a 512-token block; head groups of more than four (two passes)
SHAPES = [
    (1, 4, 2, 16, 1), (2, 6, 2, 24, 37), (1, 8, 1, 64, 1100), (2, 12, 2, 16, 600),
    (1, 3, 3, 8, 513),
]


def _cache(B, H_kv, D, L, dtype=torch.float32, spare=5):
    """keys_t and values as an attention cache holds them: the filled part of larger buffers."""
    keys_t = torch.randn(B, H_kv, D, L + spare, dtype=dtype)[..., :L]
    values = torch.randn(B, H_kv, L + spare, D, dtype=dtype)[:, :, :L]
    return keys_t, values


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(backend, shape):
    B, H, H_kv, D, L = shape
    q = torch.randn(B, H, D)
    keys_t, values = _cache(B, H_kv, D, L)
    expected = decode_attention(q.double(), keys_t.double(), values.double(), backend="reference")
    got = decode_attention(q, keys_t, values, backend=backend)
    assert got.shape == (B, H, D) and got.dtype == torch.float32
    assert_close(f"out ({backend})", expected, got, 1e-5)


def test_reference_equals_sdpa():
    q = torch.randn(2, 6, 16, dtype=torch.float64)
    keys_t, values = _cache(2, 3, 16, 20, torch.float64)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], keys_t.transpose(2, 3), values, enable_gqa=True, scale=0.3
    )[:, :, 0]
    got = decode_attention(q, keys_t, values, scale=0.3, backend="reference")
    assert_close("out", expected, got, 1e-12)


def test_cpu_kernel_builds_and_is_what_auto_takes_for_float32():
    assert cpu.load(), "the C++ kernel must build on a machine with a compiler (see the warning)"
    q = torch.randn(1, 4, 16)
    keys_t, values = _cache(1, 2, 16, 700)
    auto = decode_attention(q, keys_t, values)
    assert torch.equal(auto, decode_attention(q, keys_t, values, backend="cpu"))
    assert not torch.equal(auto, decode_attention(q, keys_t, values, backend="torch"))


def test_cpu_kernel_does_not_depend_on_the_thread_count():
    q = torch.randn(2, 4, 16)
    keys_t, values = _cache(2, 2, 16, 3000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = decode_attention(q, keys_t, values, backend="cpu")
        torch.set_num_threads(max(2, threads))
        many = decode_attention(q, keys_t, values, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_inside_torch_compile_with_a_growing_cache():
    keys_buffer, values_buffer = torch.randn(1, 2, 16, 64), torch.randn(1, 2, 64, 16)

    def step(q, length):
        return decode_attention(q, keys_buffer[..., :length], values_buffer[:, :, :length])

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for length in (5, 6, 40):
        q = torch.randn(1, 4, 16)
        expected = decode_attention(
            q.double(), keys_buffer[..., :length].double(),
            values_buffer[:, :, :length].double(), backend="reference",
        )
        assert_close(f"out at {length}", expected, compiled(q, length), 1e-5)


@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_half_precision_caches_take_the_cpu_kernel(dtype, tolerance):
    q = torch.randn(2, 6, 32)
    keys_t, values = _cache(2, 2, 32, 700)
    q, keys_t, values = q.to(dtype), keys_t.to(dtype), values.to(dtype)
    expected = decode_attention(q.double(), keys_t.double(), values.double(), backend="reference")
    got = decode_attention(q, keys_t, values)
    assert got.dtype == dtype
    assert torch.equal(got, decode_attention(q, keys_t, values, backend="cpu"))
    assert_close(f"out ({dtype})", expected, got, tolerance)
    # the kernel computes in float32 from the rounded inputs: only the output is rounded
    torch_path = decode_attention(q, keys_t, values, backend="torch")
    assert (got.double() - expected).abs().max() <= (torch_path.double() - expected).abs().max()


def test_cpu_backend_names_its_dtypes():
    q = torch.randn(1, 4, 16, dtype=torch.float64)
    keys_t, values = _cache(1, 2, 16, 9, torch.float64)
    with pytest.raises(ValueError, match="bfloat16"):
        decode_attention(q, keys_t, values, backend="cpu")


def test_gradients_go_through_the_pytorch_path():
    q = torch.randn(1, 2, 8, requires_grad=True)
    keys_t, values = _cache(1, 1, 8, 6)
    decode_attention(q, keys_t, values).sum().backward()  # auto: the torch path
    assert q.grad is not None and q.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no backward"):
        decode_attention(q, keys_t, values, backend="cpu")


@pytest.mark.parametrize(
    "q_shape,kt_shape,v_shape,match",
    [
        ((1, 4, 16), (1, 3, 16, 5), (1, 3, 5, 16), "multiple of H_kv"),
        ((1, 4, 16), (1, 2, 8, 5), (1, 2, 5, 16), "do not fit"),
        ((1, 4, 16), (1, 2, 16, 5), (1, 2, 6, 16), "do not fit"),
        ((1, 4, 16), (1, 2, 16, 0), (1, 2, 0, 16), "empty"),
        ((1, 1, 4, 16), (1, 2, 16, 5), (1, 2, 5, 16), r"q \(B, H, D\)"),
    ],
)
def test_bad_shapes_are_named(q_shape, kt_shape, v_shape, match):
    with pytest.raises(ValueError, match=match):
        decode_attention(torch.randn(q_shape), torch.randn(kt_shape), torch.randn(v_shape))


def test_unknown_backend_is_named():
    q = torch.randn(1, 2, 8)
    keys_t, values = _cache(1, 1, 8, 3)
    with pytest.raises(ValueError, match="backend='fast'"):
        decode_attention(q, keys_t, values, backend="fast")


def test_bench_entry_runs_quick(tmp_path):
    from zoo.app.bench import BenchOptions, load_entries, run_bench

    load_entries()
    options = BenchOptions(quick=True, repeats=1, warmup=0, out_dir=tmp_path)
    rows = run_bench("decode-attention-op", options, plot=False)["rows"]
    impls = {row["impl"] for row in rows}
    assert {"zoo C++ kernel", "torch (compiled)", "sdpa, time-major keys (peer)"} <= impls
    assert all(row["us_min"] > 0 and row["cache_GB_per_s"] > 0 for row in rows)
    assert (tmp_path / "decode-attention-op.json").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_on_cuda_matches_reference(shape):
    B, H, H_kv, D, L = shape
    q = torch.randn(B, H, D, device="cuda")
    keys_t = torch.randn(B, H_kv, D, L + 5, device="cuda")[..., :L]
    values = torch.randn(B, H_kv, L + 5, D, device="cuda")[:, :, :L]
    expected = decode_attention(q.double(), keys_t.double(), values.double(), backend="reference")
    assert_close("out (cuda)", expected, decode_attention(q, keys_t, values), 1e-5)


def test_without_the_cpu_kernel_auto_takes_the_pytorch_path(monkeypatch):
    # the module (zoo.kernels' attribute of that name is the function)
    op = importlib.import_module("zoo.kernels.decode_attention")
    q = torch.randn(1, 4, 16)
    keys_t, values = _cache(1, 2, 16, 40)
    monkeypatch.setattr(op, "_cpu_kernel_available", lambda: False)
    assert torch.equal(decode_attention(q, keys_t, values),
                       decode_attention(q, keys_t, values, backend="torch"))


def test_zoo_cpu_kernels_0_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv("ZOO_CPU_KERNELS", "0")
    cpu.load.cache_clear()
    try:
        assert cpu.load() is False
    finally:
        monkeypatch.delenv("ZOO_CPU_KERNELS")
        cpu.load.cache_clear()
    assert cpu.load()


# ---- an int8 KV cache: codes and one scale per token and head (kv_quant.py)


def _int8_cache(B, H_kv, D, L, spare=5):
    """An int8 cache as layers/attention.py holds it: the filled part of larger buffers."""
    from zoo.kernels.decode_attention.kv_quant import quantize_int8_per_token

    k_codes, k_scales = quantize_int8_per_token(torch.randn(B, H_kv, L + spare, D))
    v_codes, v_scales = quantize_int8_per_token(torch.randn(B, H_kv, L + spare, D))
    return (k_codes.transpose(2, 3).contiguous()[..., :L], k_scales[..., :L],
            v_codes[:, :, :L], v_scales[..., :L])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_int8_cpu_kernel_matches_dequantised_reference(shape, dtype):
    from zoo.kernels.decode_attention import decode_attention_int8

    B, H, H_kv, D, L = shape
    q = torch.randn(B, H, D).to(dtype)
    cache = _int8_cache(B, H_kv, D, L)
    expected = decode_attention_int8(q.double(), *cache, backend="reference")
    got = decode_attention_int8(q, *cache, backend="cpu")
    assert got.shape == (B, H, D) and got.dtype == dtype
    # float32 sums; a bfloat16 query and output round to 2^-8
    assert_close("out (int8 cpu)", expected, got, 1e-5 if dtype == torch.float32 else 8e-3)


def test_int8_reference_is_the_float_reference_on_the_dequantised_cache():
    from zoo.kernels.decode_attention import decode_attention_int8

    q = torch.randn(2, 4, 16, dtype=torch.float64)
    k_codes_t, k_scales, v_codes, v_scales = _int8_cache(2, 2, 16, 40)
    keys_t = k_codes_t.double() * k_scales.double()[:, :, None, :]
    values = v_codes.double() * v_scales.double()[..., None]
    expected = decode_attention(q, keys_t, values, backend="reference")
    got = decode_attention_int8(q, k_codes_t, k_scales, v_codes, v_scales, backend="reference")
    assert_close("out", expected, got, 1e-12)


def test_int8_scales_of_the_wrong_shape_are_refused_by_name():
    from zoo.kernels.decode_attention import decode_attention_int8

    k_codes_t, k_scales, v_codes, v_scales = _int8_cache(1, 2, 16, 10)
    with pytest.raises(ValueError, match="v_scales"):
        decode_attention_int8(torch.randn(1, 2, 16), k_codes_t, k_scales, v_codes,
                              v_scales[..., :9])
