import pytest
import torch

from zoo.kernels import moe_experts
from zoo.kernels.moe import sort_slots_by_expert
from zoo.testing import assert_close

BACKENDS = ["torch", "triton"]


def _inputs(N, D, I, E, K, activation, dtype=torch.float32, drop=0.0):
    rows = 2 * I if activation == "swiglu" else I
    x = torch.randn(N, D, dtype=dtype).requires_grad_()
    gate_up = (torch.randn(E, rows, D, dtype=dtype) / D**0.5).requires_grad_()
    down = (torch.randn(E, D, I, dtype=dtype) / I**0.5).requires_grad_()
    # K distinct experts per token, as top-k gives
    ids = torch.rand(N, E).argsort(-1)[:, :K]
    if drop:
        ids = torch.where(torch.rand(N, K) < drop, -1, ids)
    weights = torch.rand(N, K, dtype=dtype).softmax(-1).requires_grad_()
    return x, gate_up, down, ids, weights


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,D,I,E,K", [(1, 16, 16, 4, 2), (37, 32, 24, 8, 2), (20, 24, 40, 3, 1),
                                       (9, 16, 16, 6, 3)])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_matches_reference_forward_and_backward(backend, N, D, I, E, K, activation):
    inputs = _inputs(N, D, I, E, K, activation, drop=0.2)
    _assert_matches_reference(inputs, activation, backend)


def _assert_matches_reference(inputs, activation, backend):
    """Output and the gradients of x, both weight stacks and the routing weights, against the
    float64 reference."""
    x, gate_up, down, ids, weights = inputs
    leaves = [x, gate_up, down, weights]
    dy = torch.randn(*x.shape)

    ref = moe_experts(*(t.double() for t in (x, gate_up, down)), ids, weights.double(),
                      activation=activation, backend="reference")
    (ref * dy.double()).sum().backward()
    ref_grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None

    y = moe_experts(x, gate_up, down, ids, weights, activation=activation, backend=backend)
    (y * dy).sum().backward()
    assert_close("y", ref, y, 1e-5)
    for name, r, t in zip(["dx", "dgate_up_proj", "ddown_proj", "dweights"], ref_grads, leaves):
        assert_close(name, r, t.grad, 1e-5)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_gathered_decode_path_matches_reference_with_dropped_slots(activation):
    """N * K <= E takes the torch path's gather-the-experts branch (decoding)."""
    torch.manual_seed(3)
    inputs = _inputs(3, 16, 16, 8, 2, activation)
    inputs[3][1, 0] = -1  # a dropped slot
    _assert_matches_reference(inputs, activation, "torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropped_slots_add_nothing_and_get_zero_weight_grad(backend):
    x, gate_up, down, ids, weights = _inputs(12, 16, 16, 4, 2, "swiglu")
    ids[3] = -1  # token 3 lost both slots: zero output
    ids[5, 1] = -1  # token 5 keeps only its first expert
    y = moe_experts(x, gate_up, down, ids, weights, backend=backend)
    y.sum().backward()
    assert torch.all(y[3] == 0)
    assert torch.all(weights.grad[3] == 0) and weights.grad[5, 1] == 0
    only_first = moe_experts(x[5:6], gate_up, down, ids[5:6, :1], weights[5:6, :1],
                             backend="reference")
    assert_close("y[5]", only_first, y[5:6], 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_close_to_reference(backend):
    x, gate_up, down, ids, weights = _inputs(33, 32, 32, 4, 2, "swiglu")
    ref = moe_experts(*(t.double() for t in (x, gate_up, down)), ids, weights.double(),
                      backend="reference")
    bf = [t.detach().bfloat16() for t in (x, gate_up, down)]
    y = moe_experts(*bf, ids, weights.detach().float(), backend=backend)
    assert y.dtype == torch.bfloat16
    assert_close("y_bf16", ref, y, 3e-2)


def test_sort_groups_slots_by_expert_keeping_token_order():
    ids = torch.tensor([[2, 0], [0, -1], [1, 2], [-1, -1]])
    order, counts = sort_slots_by_expert(ids, 3)
    assert counts.tolist() == [2, 1, 2]
    # expert 0: slots 1 (token 0) and 2 (token 1); expert 1: slot 4; expert 2: slots 0, 5
    assert order[:5].tolist() == [1, 2, 4, 0, 5]
    assert sorted(order[5:].tolist()) == [3, 6, 7]


@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_without_tokens_gets_zero_weight_grad(backend):
    x, gate_up, down, _, weights = _inputs(10, 16, 16, 4, 1, "swiglu")
    ids = torch.zeros(10, 1, dtype=torch.long)  # everything to expert 0
    moe_experts(x, gate_up, down, ids, weights, backend=backend).sum().backward()
    assert gate_up.grad[0].abs().sum() > 0
    assert torch.all(gate_up.grad[1:] == 0) and torch.all(down.grad[1:] == 0)


def test_bad_inputs_name_the_argument():
    x = torch.randn(5, 8)
    gu, down = torch.randn(4, 12, 8), torch.randn(4, 8, 6)
    ids, w = torch.zeros(5, 2, dtype=torch.long), torch.ones(5, 2)
    with pytest.raises(ValueError, match="activation"):
        moe_experts(x, gu, down, ids, w, activation="relu")
    with pytest.raises(ValueError, match="gate_up_proj"):
        moe_experts(x, gu, down, ids, w, activation="gelu")
    with pytest.raises(ValueError, match="down_proj"):
        moe_experts(x, gu, torch.randn(4, 7, 6), ids, w)
    with pytest.raises(ValueError, match="expert_ids"):
        moe_experts(x, gu, down, ids.float(), w)
    with pytest.raises(ValueError, match="expert_ids"):
        moe_experts(x, gu, down, ids + 4, w)
    with pytest.raises(ValueError, match="weights"):
        moe_experts(x, gu, down, ids, w[:, :1])
    with pytest.raises(ValueError, match="backend"):
        moe_experts(x, gu, down, ids, w, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_auto_backend_matches_reference(dtype):
    N, D, I, E, K = 300, 128, 96, 8, 2
    x = torch.randn(N, D, device="cuda")
    gate_up = torch.randn(E, 2 * I, D, device="cuda") / D**0.5
    down = torch.randn(E, D, I, device="cuda") / I**0.5
    ids = torch.rand(N, E, device="cuda").argsort(-1)[:, :K]
    w = torch.rand(N, K, device="cuda").softmax(-1)
    ref = moe_experts(x.double(), gate_up.double(), down.double(), ids, w.double(),
                      backend="reference")
    y = moe_experts(x.to(dtype), gate_up.to(dtype), down.to(dtype), ids, w)
    assert_close("y", ref, y, 1e-5 if dtype == torch.float32 else 3e-2)
