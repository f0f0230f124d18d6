"""zoo's Linear: the blocked few-row product equals nn.Linear, and is taken exactly when meant."""

import pytest
import torch
import torch.nn.functional as F

from zoo.layers.linear import MAX_BLOCKED_ROWS, Linear, blocked_linear, row_blocks
from zoo.testing import assert_close


@pytest.mark.parametrize("blocks", [2, 4, 16])
@pytest.mark.parametrize("shape", [(1, 96), (3, 1, 96), (2, 5, 96)])
@pytest.mark.parametrize("bias", [False, True])
def test_blocked_linear_equals_f_linear(blocks, shape, bias):
    torch.manual_seed(0)
    weight = torch.randn(64, 96, dtype=torch.float64)
    b = torch.randn(64, dtype=torch.float64) if bias else None
    x = torch.randn(*shape, dtype=torch.float64)
    y = blocked_linear(x, weight, b, blocks)
    assert y.shape == (*shape[:-1], 64)
    assert_close("y", F.linear(x, weight, b), y, 1e-12)


def test_blocked_linear_gradients():
    torch.manual_seed(0)
    weight = torch.randn(32, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(32, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 16, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda *a: blocked_linear(*a, 4), (x, weight, bias))


def test_row_blocks():
    assert row_blocks(49152) == 16
    assert row_blocks(24) == 8
    assert row_blocks(6) == 2
    assert row_blocks(7) == 1


def _calls(monkeypatch):
    seen = []
    import zoo.layers.linear as module

    real = module.blocked_linear

    def spy(*args):
        seen.append(args[3])
        return real(*args)

    monkeypatch.setattr(module, "blocked_linear", spy)
    return seen


def test_linear_blocks_few_rows_of_a_large_weight(monkeypatch):
    seen = _calls(monkeypatch)
    layer = Linear(512, 1024)  # 2**19 weights
    x = torch.randn(1, 1, 512)
    with torch.no_grad():
        assert_close("y", F.linear(x, layer.weight, layer.bias), layer(x), 1e-5)
    assert seen == [16]


def test_linear_keeps_f_linear_for_many_rows_or_small_weights(monkeypatch):
    seen = _calls(monkeypatch)
    with torch.no_grad():
        Linear(512, 1024)(torch.randn(MAX_BLOCKED_ROWS + 1, 512))  # training-sized input
        Linear(64, 64)(torch.randn(1, 64))  # stays in cache: the plain product is as fast
        Linear(512, 1023)(torch.randn(1, 512))  # no block count divides 1023
    assert seen == []


def test_linear_is_an_nn_linear_with_the_same_state_dict():
    layer = Linear(8, 4)
    plain = torch.nn.Linear(8, 4)
    assert isinstance(layer, torch.nn.Linear)
    assert layer.state_dict().keys() == plain.state_dict().keys()
