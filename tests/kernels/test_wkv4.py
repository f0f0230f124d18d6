import pytest
import torch
from transformers.models.rwkv.modeling_rwkv import rwkv_linear_attention_cpu

from zoo.kernels import wkv4
from zoo.kernels.wkv4 import empty_wkv4_state, wkv4_recurrent
from zoo.testing import assert_close

BACKENDS = ["torch", "triton"]


def _state(B, C, dtype):
    """A state as the recurrence leaves it: den > 0, max around the size of the keys."""
    num, den, mx = torch.randn(B, C), torch.rand(B, C) + 0.5, torch.randn(B, C)
    return torch.stack([num, den, mx], 1).to(dtype)


def _inputs(B, T, C, dtype, with_state, key_scale=1.0):
    w = torch.randn(C, dtype=dtype).requires_grad_()
    u = torch.randn(C, dtype=dtype).requires_grad_()
    k = (key_scale * torch.randn(B, T, C, dtype=dtype)).requires_grad_()
    v = torch.randn(B, T, C, dtype=dtype).requires_grad_()
    h0 = _state(B, C, dtype).requires_grad_() if with_state else None
    return w, u, k, v, h0


def _run(backend, w, u, k, v, h0, dtype=None):
    cast = (lambda t: t) if dtype is None else (lambda t: None if t is None else t.to(dtype))
    return wkv4(cast(w), cast(u), cast(k), cast(v), initial_state=cast(h0),
                output_final_state=True, backend=backend)


def _check_against_reference(backend, B, T, C, with_state, key_scale=1.0, ratio=1e-5):
    w, u, k, v, h0 = _inputs(B, T, C, torch.float32, with_state, key_scale)
    leaves = [t for t in (w, u, k, v, h0) if t is not None]
    dy, dht = torch.randn(B, T, C), torch.randn(B, 3, C)

    ref_y, ref_ht = _run("reference", w, u, k, v, h0, dtype=torch.float64)
    ((ref_y * dy.double()).sum() + (ref_ht * dht.double()).sum()).backward()
    ref_grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None

    y, ht = _run(backend, w, u, k, v, h0)
    ((y * dy).sum() + (ht * dht).sum()).backward()
    assert_close("y", ref_y, y, ratio)
    for i, row in enumerate(["num", "den", "max"]):
        assert_close(f"final_state {row}", ref_ht[:, i], ht[:, i], ratio)
    for name, ref, t in zip(["dw", "du", "dk", "dv", "dh0"], ref_grads, leaves):
        assert_close(name, ref, t.grad, 10 * ratio)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,T,C", [(1, 1, 8), (2, 7, 24), (3, 65, 16), (2, 33, 72)])
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_reference_forward_and_backward(backend, B, T, C, with_state):
    _check_against_reference(backend, B, T, C, with_state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_keys_do_not_overflow(backend):
    # e^60 overflows nothing in float64 but e^(60 + 60) would in float32 without the running max
    _check_against_reference(backend, 2, 40, 16, with_state=True, key_scale=60.0)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_long_sequence_keeps_slow_and_fast_decays_finite(backend):
    # w = -9: decay ~ 1 - 1e-4 (sums grow with T); w = 3: decay e^-20 per step (state vanishes)
    T, C = 1500 if backend != "triton" else 400, 4
    w = torch.tensor([-9.0, -1.0, 1.0, 3.0])
    u = torch.zeros(C)
    k = 30 + 5 * torch.randn(1, T, C)
    v = torch.randn(1, T, C)
    y, ht = wkv4(w, u, k, v, output_final_state=True, backend=backend)
    assert torch.isfinite(y).all() and torch.isfinite(ht).all()
    ref, ref_ht = wkv4(w.double(), u.double(), k.double(), v.double(), output_final_state=True,
                       backend="reference")
    assert_close("y", ref, y, 1e-4)
    assert_close("final_state", ref_ht, ht, 1e-4)


def test_same_convention_as_transformers_rwkv():
    B, T, C = 2, 9, 16
    w, u = torch.randn(C), torch.randn(C)
    k, v = torch.randn(B, T, C), torch.randn(B, T, C)
    h0 = _state(B, C, torch.float32)
    theirs, their_state = rwkv_linear_attention_cpu(w, u, k, v, state=list(h0.unbind(1)),
                                                    return_state=True)
    ours, our_state = wkv4(w, u, k, v, initial_state=h0, output_final_state=True,
                           backend="reference")
    assert_close("y", theirs, ours, 1e-6)
    assert_close("final_state", torch.stack(their_state, 1), our_state, 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_close_to_reference(backend):
    w, u, k, v, h0 = _inputs(2, 33, 32, torch.float32, True)
    ref_y, _ = _run("reference", w, u, k, v, h0, dtype=torch.float64)
    y, ht = wkv4(w, u, k.bfloat16(), v.bfloat16(), initial_state=h0, output_final_state=True,
                 backend=backend)
    assert y.dtype == torch.bfloat16 and ht.dtype == torch.float32
    assert_close("y_bf16", ref_y, y, 3e-2)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_split_with_carried_state_equals_whole(backend):
    w, u = torch.randn(12), torch.randn(12)
    k, v = torch.randn(2, 20, 12), torch.randn(2, 20, 12)
    whole, whole_h = wkv4(w, u, k, v, output_final_state=True, backend=backend)
    y1, h = wkv4(w, u, k[:, :2], v[:, :2], output_final_state=True, backend=backend)
    y2, h = wkv4(w, u, k[:, 2:3], v[:, 2:3], initial_state=h, output_final_state=True,
                 backend=backend)
    y3, h = wkv4(w, u, k[:, 3:], v[:, 3:], initial_state=h, output_final_state=True,
                 backend=backend)
    assert_close("y", whole, torch.cat([y1, y2, y3], 1), 1e-6)
    assert_close("final_state", whole_h, h, 1e-6)


def test_empty_state_equals_no_state():
    w, u = torch.randn(8), torch.randn(8)
    k, v = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    y, _ = wkv4(w, u, k, v)
    y0, _ = wkv4(w, u, k, v, initial_state=empty_wkv4_state(2, 8))
    assert_close("y", y, y0, 0.0)


def test_bad_shapes_name_the_argument():
    k = torch.randn(2, 5, 8)
    w = torch.randn(8)
    with pytest.raises(ValueError, match="w must"):
        wkv4(torch.randn(7), w, k, k)
    with pytest.raises(ValueError, match="u must"):
        wkv4(w, torch.randn(2, 8), k, k)
    with pytest.raises(ValueError, match="v must"):
        wkv4(w, w, k, torch.randn(2, 5, 9))
    with pytest.raises(ValueError, match="initial_state"):
        wkv4(w, w, k, k, initial_state=torch.randn(2, 8, 3))
    with pytest.raises(ValueError, match="backend"):
        wkv4(w, w, k, k, backend="cuda")


@pytest.mark.gpu
def test_cuda_auto_backend_matches_reference():
    B, T, C = 2, 300, 256
    w, u = torch.randn(C, device="cuda"), torch.randn(C, device="cuda")
    k, v = torch.randn(B, T, C, device="cuda"), torch.randn(B, T, C, device="cuda")
    ref, ref_h = wkv4(w, u, k, v, output_final_state=True, backend="reference")
    y, h = wkv4(w, u, k, v, output_final_state=True)
    assert_close("y", ref, y, 1e-5)
    assert_close("final_state", ref_h, h, 1e-5)


@pytest.mark.parametrize("key_scale", [1.0, 60.0])
def test_recurrent_token_by_token_matches_reference(key_scale):
    B, T, C = 2, 9, 16
    w, u, k, v, h0 = _inputs(B, T, C, torch.float32, True, key_scale)
    leaves = [w, u, k, v, h0]
    dy, dht = torch.randn(B, T, C), torch.randn(B, 3, C)

    ref_y, ref_ht = _run("reference", w, u, k, v, h0, dtype=torch.float64)
    ((ref_y * dy.double()).sum() + (ref_ht * dht.double()).sum()).backward()
    ref_grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None

    ys, state = [], h0
    for t in range(T):
        y_t, state = wkv4_recurrent(w, u, k[:, t : t + 1], v[:, t : t + 1], state,
                                    output_final_state=True)
        ys.append(y_t)
    y = torch.cat(ys, 1)
    ((y * dy).sum() + (state * dht).sum()).backward()
    assert_close("y", ref_y, y, 1e-5)
    for i, row in enumerate(["num", "den", "max"]):
        assert_close(f"final_state {row}", ref_ht[:, i], state[:, i], 1e-5)
    for name, ref, t in zip(["dw", "du", "dk", "dv", "dh0"], ref_grads, leaves):
        assert_close(name, ref, t.grad, 1e-4)


def test_one_token_on_the_torch_path_is_the_recurrent_form():
    w, u, k, v, h0 = (t.detach() for t in _inputs(2, 1, 8, torch.float32, True))
    for got, expected in zip(wkv4(w, u, k, v, h0, True, backend="torch"),
                             wkv4_recurrent(w, u, k, v, h0, True)):
        assert torch.equal(got, expected)


def test_recurrent_form_takes_one_token():
    k = torch.randn(1, 3, 4)
    with pytest.raises(ValueError, match=r"wkv4_recurrent: takes one token .* T = 3"):
        wkv4_recurrent(torch.randn(4), torch.randn(4), k, k)
