import pytest
import torch

from zoo.kernels import causal_conv1d
from zoo.kernels.causal_conv1d import causal_conv1d_recurrent
from zoo.testing import assert_close

BACKENDS = ["torch", "triton"]


def _inputs(B, T, D, W, dtype, with_state):
    x = torch.randn(B, T, D, dtype=dtype).requires_grad_()
    w = (torch.randn(D, W, dtype=dtype) / W**0.5).requires_grad_()
    b = torch.randn(D, dtype=dtype).requires_grad_()
    h0 = torch.randn(B, W - 1, D, dtype=dtype).requires_grad_() if with_state else None
    return [t for t in (x, w, b, h0)]


def _run(backend, x, w, b, h0, activation, dtype=None):
    cast = (lambda t: t) if dtype is None else (lambda t: None if t is None else t.to(dtype))
    y, ht = causal_conv1d(cast(x), cast(w), cast(b), activation=activation,
                          initial_state=cast(h0), output_final_state=True, backend=backend)
    return y, ht


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,T,D,W", [(1, 1, 8, 4), (2, 7, 24, 4), (3, 65, 16, 2), (2, 3, 40, 4)])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_matches_reference_forward_and_backward(backend, B, T, D, W, with_state, activation):
    x, w, b, h0 = _inputs(B, T, D, W, torch.float32, with_state)
    leaves = [t for t in (x, w, b, h0) if t is not None]
    dy = torch.randn(B, T, D)
    dht = torch.randn(B, W - 1, D)

    ref_y, ref_ht = _run("reference", x, w, b, h0, activation, dtype=torch.float64)
    ((ref_y * dy.double()).sum() + (ref_ht * dht.double()).sum()).backward()
    ref_grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None

    y, ht = _run(backend, x, w, b, h0, activation)
    ((y * dy).sum() + (ht * dht).sum()).backward()
    assert_close("y", ref_y, y, 1e-5)
    assert_close("final_state", ref_ht, ht, 1e-6)
    for name, ref, t in zip(["dx", "dw", "db", "dh0"], ref_grads, leaves):
        assert_close(name, ref, t.grad, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_close_to_reference(backend):
    x, w, b, h0 = _inputs(2, 33, 32, 4, torch.float32, True)
    ref_y, _ = _run("reference", x, w, b, h0, "silu", dtype=torch.float64)
    y, ht = _run(backend, x, w, b, h0, "silu", dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16 and ht.dtype == torch.bfloat16
    assert_close("y_bf16", ref_y, y, 2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_split_with_carried_state_equals_whole(backend):
    x = torch.randn(2, 20, 12)
    w, b = torch.randn(12, 4), torch.randn(12)
    whole, _ = causal_conv1d(x, w, b, activation="silu", backend=backend)
    y1, h = causal_conv1d(x[:, :2], w, b, activation="silu", output_final_state=True,
                          backend=backend)
    y2, h = causal_conv1d(x[:, 2:3], w, b, activation="silu", initial_state=h,
                          output_final_state=True, backend=backend)
    y3, _ = causal_conv1d(x[:, 3:], w, b, activation="silu", initial_state=h, backend=backend)
    assert_close("y", whole, torch.cat([y1, y2, y3], 1), 1e-6)


def test_bad_shapes_name_the_argument():
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d(x, torch.randn(7, 4))
    with pytest.raises(ValueError, match="initial_state"):
        causal_conv1d(x, torch.randn(8, 4), initial_state=torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, torch.randn(8, 4), activation="gelu")
    with pytest.raises(ValueError, match="backend"):
        causal_conv1d(x, torch.randn(8, 4), backend="cuda")


@pytest.mark.gpu
def test_cuda_auto_backend_matches_reference():
    x = torch.randn(2, 300, 64, device="cuda")
    w, b = torch.randn(64, 4, device="cuda"), torch.randn(64, device="cuda")
    h0 = torch.randn(2, 3, 64, device="cuda")
    ref, ref_h = causal_conv1d(x, w, b, activation="silu", initial_state=h0,
                               output_final_state=True, backend="reference")
    y, h = causal_conv1d(x, w, b, activation="silu", initial_state=h0, output_final_state=True)
    assert_close("y", ref, y, 1e-5)
    assert_close("final_state", ref_h, h, 1e-6)


@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_recurrent_token_by_token_matches_reference(W, activation):
    B, T, D = 2, 9, 12
    x, w, b, h0 = _inputs(B, T, D, W, torch.float32, with_state=True)
    leaves = [x, w, b, h0]
    dy, dht = torch.randn(B, T, D), torch.randn(B, W - 1, D)

    ref_y, ref_ht = _run("reference", x, w, b, h0, activation, dtype=torch.float64)
    ((ref_y * dy.double()).sum() + (ref_ht * dht.double()).sum()).backward()
    ref_grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None

    ys, state = [], h0
    for t in range(T):
        y_t, state = causal_conv1d_recurrent(x[:, t : t + 1], w, b, activation, state,
                                             output_final_state=True)
        ys.append(y_t)
    y = torch.cat(ys, 1)
    ((y * dy).sum() + (state * dht).sum()).backward()
    assert_close("y", ref_y, y, 1e-5)
    assert_close("final_state", ref_ht, state, 1e-6)
    for name, ref, t in zip(["dx", "dw", "db", "dh0"], ref_grads, leaves):
        assert_close(name, ref, t.grad, 1e-5)


def test_one_token_on_the_torch_path_is_the_recurrent_form():
    x, w, b, h0 = (t.detach() for t in _inputs(2, 1, 8, 4, torch.float32, with_state=True))
    y, ht = causal_conv1d(x, w, b, activation="silu", initial_state=h0, output_final_state=True,
                          backend="torch")
    y_rec, ht_rec = causal_conv1d_recurrent(x, w, b, "silu", h0, True)
    assert torch.equal(y, y_rec) and torch.equal(ht, ht_rec)
    assert ht.is_contiguous()


def test_recurrent_form_takes_one_token():
    with pytest.raises(ValueError, match=r"causal_conv1d_recurrent: takes one token .* T = 3"):
        causal_conv1d_recurrent(torch.randn(1, 3, 4), torch.randn(4, 2))
