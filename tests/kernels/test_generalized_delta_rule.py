"""generalized_delta_rule's Triton kernels (run through Triton's interpreter on the CPU) against
the float64 reference: output, final state and every gradient, initial state's included.

The kernels compute in float64 for float64 inputs, so most comparisons are float64 to float64,
bounded by the rounding of the computation itself: each output or gradient is a sum of at most
T (K + 2) rounded products, whose error is at most that count times the unit roundoff, relative
to the terms summed (`_rounding_bound`).
"""

import pytest
import torch
import torch.nn.functional as F

from zoo.kernels import generalized_delta_rule
from zoo.kernels.backend import resolve_backend
from zoo.kernels.delta_rule import GENERALIZED_OP_BACKENDS
from zoo.testing import assert_close

DECAY_FORMS = ["none", "step", "channel"]
CHUNK = 4  # small chunks keep the interpreter fast and cross a chunk boundary in T = 7
H, K, V = 2, 12, 10  # K and V below the kernel's 16-wide tiles: the masks are exercised


def _rounding_bound(T: int, dtype: torch.dtype) -> float:
    """T (K + 2) roundings of the unit roundoff eps / 2 of `dtype`."""
    return T * (K + 2) * torch.finfo(dtype).eps / 2


def _inputs(B, T, form, with_state, value_dim=V, dtype=torch.float64):
    """RWKV-7's shape of inputs (a = -kappa_hat, b = kappa_hat * iclr with a unit kappa_hat and
    iclr in [0, 1]: the transition's eigenvalues in [-1, 1]) as leaves that require gradients."""
    kappa = F.normalize(torch.randn(B, T, H, K), dim=-1)
    decay_shape = {"none": None, "step": (B, T, H), "channel": (B, T, H, K)}[form]
    inputs = {
        "q": torch.randn(B, T, H, K),
        "k": 0.5 * torch.randn(B, T, H, K),
        "v": torch.randn(B, T, H, value_dim),
        "a": -kappa,
        "b": kappa * torch.rand(B, T, H, K),
        "decay": F.logsigmoid(torch.randn(decay_shape) + 2.0) if decay_shape else None,
        "initial_state": torch.randn(B, H, K, value_dim) if with_state else None,
    }
    return {name: t.to(dtype).requires_grad_() if t is not None else None
            for name, t in inputs.items()}


def _run_and_grads(inputs, backend, dtype, do, dht):
    """o, final state and the gradient of (o * do).sum() + (ht * dht).sum() for every input."""
    leaves = {name: t for name, t in inputs.items() if t is not None}
    for t in leaves.values():
        t.grad = None
    cast = {name: t.to(dtype) if t is not None else None for name, t in inputs.items()}
    o, ht = generalized_delta_rule(cast.pop("q"), cast.pop("k"), cast.pop("v"), cast.pop("a"),
                                   cast.pop("b"), **cast, output_final_state=True,
                                   chunk_size=CHUNK, backend=backend)
    ((o.double() * do).sum() + (ht.double() * dht).sum()).backward()
    return o, ht, {"d" + name: t.grad.clone() for name, t in leaves.items()}


def _compare(inputs, dtype, ratio, backend="triton"):
    """Run the reference in float64 and `backend` in `dtype` on the same inputs; every output
    and gradient within `ratio` of the reference's largest entry. Returns `backend`'s o and
    final state."""
    B, T = inputs["q"].shape[:2]
    value_dim = inputs["v"].shape[-1]
    # upstream gradients exact in `dtype`: o's backward would round them to it
    do = torch.randn(B, T, H, value_dim).to(dtype).double()
    dht = torch.randn(B, H, K, value_dim).to(dtype).double()
    o_ref, ht_ref, grads_ref = _run_and_grads(inputs, "reference", torch.float64, do, dht)
    o, ht, grads = _run_and_grads(inputs, backend, dtype, do, dht)
    assert o.dtype == dtype
    assert ht.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close("o", o_ref, o, ratio)
    assert_close("final_state", ht_ref, ht, ratio)
    assert set(grads) == set(grads_ref)
    for name, ref in grads_ref.items():
        assert_close(name, ref, grads[name], ratio)
    return o.detach(), ht.detach()


@pytest.mark.parametrize("form", DECAY_FORMS)
@pytest.mark.parametrize("with_state", [False, True])
def test_triton_matches_reference_forward_and_backward(form, with_state):
    T = CHUNK + 3
    _compare(_inputs(2, T, form, with_state), torch.float64, _rounding_bound(T, torch.float64))


@pytest.mark.parametrize("T", [1, 2 * CHUNK])
def test_triton_one_token_and_whole_chunks_match_reference(T):
    _compare(_inputs(1, T, "channel", True), torch.float64, _rounding_bound(T, torch.float64))


def test_triton_several_value_blocks_match_reference():
    # V = 80 > the kernel's block of 64 value columns: dq, dk, da, db and dg are sums of
    # per-block partials
    T = CHUNK + 3
    inputs = _inputs(1, T, "channel", True, value_dim=80)
    _compare(inputs, torch.float64, _rounding_bound(T, torch.float64))


@pytest.mark.parametrize("form", ["step", "channel"])
def test_triton_strong_and_zero_gates_are_finite_and_exact(form):
    # g from about 0 down to -20, and -inf (a gate of exactly 0, which erases the state and
    # gives its log-decay no gradient)
    T = CHUNK + 3
    inputs = _inputs(1, T, form, True)
    with torch.no_grad():
        inputs["decay"].copy_(-20 * torch.rand(inputs["decay"].shape) ** 2)
        inputs["decay"][:, 2] = -torch.inf
        inputs["decay"][:, CHUNK + 1] = -torch.inf
    _compare(inputs, torch.float64, _rounding_bound(T, torch.float64))


def test_triton_float32_within_its_rounding_and_no_grad_forward_is_the_same():
    T = CHUNK + 3
    inputs = _inputs(2, T, "channel", True)
    o_grad, ht_grad = _compare(inputs, torch.float32, _rounding_bound(T, torch.float32))
    # without gradients the forward writes no checkpoints; its numbers must not change
    fp32 = {name: t.detach().float() for name, t in inputs.items()}
    with torch.no_grad():
        o, ht = generalized_delta_rule(fp32.pop("q"), fp32.pop("k"), fp32.pop("v"),
                                       fp32.pop("a"), fp32.pop("b"), **fp32,
                                       output_final_state=True, chunk_size=CHUNK,
                                       backend="triton")
    assert torch.equal(o, o_grad) and torch.equal(ht, ht_grad)


def test_triton_bf16_within_one_rounding_of_its_outputs():
    # inputs that bf16 holds exactly: what is left is float32 computing and one rounding of
    # o and of each gradient to bf16 (its unit roundoff, 2^-8, of the largest entry)
    T = CHUNK + 3
    inputs = _inputs(2, T, "channel", True)
    with torch.no_grad():
        for t in inputs.values():
            t.copy_(t.to(torch.bfloat16))
    bf16_rounding = torch.finfo(torch.bfloat16).eps / 2
    _compare(inputs, torch.bfloat16, bf16_rounding + _rounding_bound(T, torch.float32))


def test_auto_is_triton_on_cuda_only():
    assert "triton" in GENERALIZED_OP_BACKENDS.backends
    assert resolve_backend("auto", torch.zeros(1), GENERALIZED_OP_BACKENDS) == "torch"


def test_triton_limits_are_clear_errors():
    big, v = torch.randn(1, 5, 1, 300), torch.randn(1, 5, 1, 4)
    with pytest.raises(ValueError, match=r"generalized_delta_rule: .*K <= 256"):
        generalized_delta_rule(big, big, v, big, big, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("form", DECAY_FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_matches_chunked_at_a_model_shape(form, dtype):
    # Both forms compute in float32 on the same inputs. Against float64 each stays under 1e-6
    # (measured at this shape on the CPU); bf16 adds one rounding of o and of each gradient
    # (2^-8 of the largest entry) on each side.
    B, T, heads, dim = 2, 1024, 4, 64
    kappa = F.normalize(torch.randn(B, T, heads, dim), dim=-1)
    decay_shape = {"none": None, "step": (B, T, heads), "channel": (B, T, heads, dim)}[form]
    inputs = {
        "q": torch.randn(B, T, heads, dim), "k": 0.5 * torch.randn(B, T, heads, dim),
        "v": torch.randn(B, T, heads, dim), "a": -kappa,
        "b": kappa * torch.rand(B, T, heads, dim),
        "decay": F.logsigmoid(torch.randn(decay_shape) + 2.0) if decay_shape else None,
        "initial_state": torch.randn(B, heads, dim, dim),
    }
    inputs = {name: t.cuda().requires_grad_() if t is not None else None
              for name, t in inputs.items()}
    do = torch.randn(B, T, heads, dim, device="cuda").to(dtype).double()
    dht = torch.randn(B, heads, dim, dim, device="cuda").double()
    results = {}
    for backend in ("auto", "torch"):
        leaves = {name: t for name, t in inputs.items() if t is not None}
        for t in leaves.values():
            t.grad = None
        cast = {name: t.to(dtype) if t is not None else None for name, t in inputs.items()}
        o, ht = generalized_delta_rule(cast.pop("q"), cast.pop("k"), cast.pop("v"),
                                       cast.pop("a"), cast.pop("b"), **cast,
                                       output_final_state=True, backend=backend)
        ((o.double() * do).sum() + (ht.double() * dht).sum()).backward()
        results[backend] = {"o": o, "final_state": ht} | {
            "d" + name: t.grad.clone() for name, t in leaves.items()}
    ratio = 1e-5 + (torch.finfo(dtype).eps if dtype == torch.bfloat16 else 0.0)
    for name, chunked in results["torch"].items():
        assert_close(name, chunked, results["auto"][name], ratio)
