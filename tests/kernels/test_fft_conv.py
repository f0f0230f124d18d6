import pytest
import torch

from zoo.kernels import fft_conv
from zoo.kernels.fft_conv import DIRECT_MAX_T, fft_conv_direct, fft_conv_fft
from zoo.testing import assert_close

BACKENDS = ["torch", "triton"]


def _inputs(B, T, P, D, L, dtype=torch.float32):
    u = torch.randn(B, T, D, dtype=dtype).requires_grad_()
    # a decaying filter, as Hyena's are: the sum stays O(1) however long the history
    k = (torch.randn(D, L, dtype=dtype) * torch.exp(-0.05 * torch.arange(L))).requires_grad_()
    bias = torch.randn(D, dtype=dtype).requires_grad_()
    past = torch.randn(B, P, D, dtype=dtype).requires_grad_() if P else None
    return u, k, bias, past


def _run(backend, u, k, bias, past, dtype=None):
    cast = (lambda t: t) if dtype is None else (lambda t: None if t is None else t.to(dtype))
    return fft_conv(cast(u), cast(k), cast(bias), initial_state=cast(past), backend=backend)


# (B, T, P, D, L): odd lengths, T = 1 (a decode step), T below and above the torch path's direct
# limit, a history P, filters longer than needed, D not a multiple of the Triton block
SHAPES = [
    (1, 1, 0, 8, 1), (2, 1, 13, 24, 20), (2, 3, 5, 16, 8), (1, 9, 0, 40, 9),
    (3, 33, 0, 16, 40), (2, 19, 21, 8, 45), (1, 65, 0, 8, 65),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,T,P,D,L", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_reference_forward_and_backward(backend, B, T, P, D, L, with_bias):
    u, k, bias, past = _inputs(B, T, P, D, L)
    bias = bias if with_bias else None
    leaves = [t for t in (u, k, bias, past) if t is not None]
    dy = torch.randn(B, T, D)

    ref = _run("reference", u, k, bias, past, dtype=torch.float64)
    (ref * dy.double()).sum().backward()
    ref_grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None

    y = _run(backend, u, k, bias, past)
    (y * dy).sum().backward()
    assert y.dtype == torch.float32
    assert_close("y", ref, y, 1e-5)
    names = ["du", "dk", "dbias", "dpast"] if with_bias else ["du", "dk", "dpast"]
    for name, r, t in zip(names, ref_grads, leaves):
        assert_close(name, r, t.grad, 1e-5)


@pytest.mark.parametrize("B,T,P,D,L", [(2, 1, 70, 8, 71), (1, 19, 30, 24, 60)])
def test_triton_split_history_matches_reference(monkeypatch, B, T, P, D, L):
    # long histories are split across programs (partial sums added on the host): force splits
    # of 16 inputs so that these small shapes cross several, including empty ones
    from zoo.kernels.fft_conv import triton_kernels

    monkeypatch.setattr(triton_kernels, "S_PER_PROGRAM", 16)
    u, k, bias, past = _inputs(B, T, P, D, L)
    leaves = [u, k, bias, past]
    dy = torch.randn(B, T, D)
    ref = _run("reference", u, k, bias, past, dtype=torch.float64)
    (ref * dy.double()).sum().backward()
    ref_grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    y = _run("triton", u, k, bias, past)
    (y * dy).sum().backward()
    assert_close("y", ref, y, 1e-5)
    for name, r, t in zip(["du", "dk", "dbias", "dpast"], ref_grads, leaves):
        assert_close(name, r, t.grad, 1e-5)


@pytest.mark.parametrize("form", [fft_conv_fft, fft_conv_direct])
def test_both_torch_forms_match_reference_at_every_length(form):
    # the torch backend switches form at DIRECT_MAX_T: check each form on both sides of it
    for T in (1, DIRECT_MAX_T, DIRECT_MAX_T + 1, 30):
        u, k, bias, past = _inputs(2, T, 7, 12, T + 9)
        ref = fft_conv(u.double(), k.double(), bias.double(), initial_state=past.double(),
                       backend="reference")
        assert_close(f"{form.__name__} T={T}", ref, form(u, k, bias, past), 1e-5)


def test_reference_is_the_direct_causal_sum():
    # the oracle itself, against the definition written as loops
    u, k, bias, past = _inputs(2, 4, 3, 5, 7, dtype=torch.float64)
    x = torch.cat([past, u], 1)
    want = torch.zeros(2, 4, 5, dtype=torch.float64)
    for t in range(4):
        for s in range(3 + t + 1):
            want[:, t] += k[:, 3 + t - s] * x[:, s]
    want += bias * u
    assert_close("y", want, fft_conv(u, k, bias, initial_state=past, backend="reference"), 1e-12)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_split_with_history_equals_whole(backend):
    u, k, bias, _ = _inputs(2, 23, 0, 8, 30)
    with torch.no_grad():
        whole = fft_conv(u, k, bias, backend=backend)
        pieces = [fft_conv(u[:, :10], k, bias, backend=backend)]
        for start, end in [(10, 11), (11, 12), (12, 23)]:
            pieces.append(fft_conv(u[:, start:end], k, bias, initial_state=u[:, :start],
                                   backend=backend))
    assert_close("y", whole, torch.cat(pieces, 1), 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_history_read_through_a_strided_view(backend):
    # the mixer passes a slice of a preallocated (B, N, capacity, D) cache
    cache = torch.randn(3, 2, 16, 8)
    u, k, bias, _ = _inputs(3, 2, 0, 8, 12)
    past = cache[:, 1, :9]
    assert not past.is_contiguous()
    with torch.no_grad():
        ref = fft_conv(u, k, bias, initial_state=past.contiguous(), backend="reference")
        got = fft_conv(u, k, bias, initial_state=past, backend=backend)
    assert_close("y", ref, got, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_close_to_reference(backend):
    u, k, bias, past = _inputs(2, 17, 6, 32, 30)
    ref = _run("reference", u, k, bias, past, dtype=torch.float64)
    y = _run(backend, u, k, bias, past, dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert_close("y_bf16", ref, y, 2e-2)


def test_long_sequence_fft_matches_reference():
    # an FFT size rounded to a power of two must not wrap the tail onto the outputs
    u, k, bias, _ = _inputs(1, 300, 0, 4, 300)
    with torch.no_grad():
        ref = fft_conv(u.double(), k.double(), bias.double(), backend="reference")
        assert_close("y", ref, fft_conv(u, k, bias, backend="torch"), 1e-5)


def test_bad_arguments_name_the_argument():
    u = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="u must be"):
        fft_conv(torch.randn(5, 8), torch.randn(8, 5))
    with pytest.raises(ValueError, match="k must be"):
        fft_conv(u, torch.randn(7, 5))
    with pytest.raises(ValueError, match="k has L=4"):
        fft_conv(u, torch.randn(8, 4))
    with pytest.raises(ValueError, match="k has L=6"):
        fft_conv(u, torch.randn(8, 6), initial_state=torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="initial_state"):
        fft_conv(u, torch.randn(8, 9), initial_state=torch.randn(3, 3, 8))
    with pytest.raises(ValueError, match="bias"):
        fft_conv(u, torch.randn(8, 5), torch.randn(7))
    with pytest.raises(ValueError, match="backend"):
        fft_conv(u, torch.randn(8, 5), backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("T,P", [(1, 700), (40, 300), (300, 0)])
def test_cuda_auto_backend_matches_reference(T, P):
    u = torch.randn(2, T, 64, device="cuda")
    past = torch.randn(2, P, 64, device="cuda")
    decay = torch.exp(-0.01 * torch.arange(P + T, device="cuda"))
    k = torch.randn(64, P + T, device="cuda") * decay
    bias = torch.randn(64, device="cuda")
    ref = fft_conv(u.double(), k.double(), bias.double(), initial_state=past.double(),
                   backend="reference")
    assert_close("y", ref, fft_conv(u, k, bias, initial_state=past), 1e-5)
