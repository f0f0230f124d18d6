"""Softmax attention's decoding pieces: the compiled step's one-query path and the KV reserve."""

import pytest
import torch
import torch.nn.functional as F

from zoo.layers.attention import Attention
from zoo.testing import assert_close


@pytest.mark.parametrize("n_heads,n_kv_heads,window", [(4, 4, None), (4, 2, None), (6, 1, 5)])
@pytest.mark.parametrize("length", [1, 9])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_one_query_equals_sdpa(n_heads, n_kv_heads, window, length, dtype, tolerance):
    torch.manual_seed(0)
    layer = Attention(48, n_heads=n_heads, n_kv_heads=n_kv_heads, window=window).to(dtype)
    D = layer.head_dim
    q = torch.randn(2, 1, n_heads, D, dtype=dtype)
    keys = torch.randn(2, length, n_kv_heads, D, dtype=dtype)
    values = torch.randn(2, length, n_kv_heads, D, dtype=dtype)
    # the query is the last position: it sees the last `window` keys
    allowed = torch.arange(length) > length - 1 - (window or length + 1)
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=allowed[None, :], enable_gqa=True,
    )
    state = layer.init_state(2, dtype=dtype, capacity=length + 3)
    state = state.write(keys.transpose(1, 2), values.transpose(1, 2))
    got = layer._one_query(q, state)  # float32: the CPU kernel; float64: the PyTorch path
    assert_close("out", expected.transpose(1, 2).reshape(2, 1, -1), got, tolerance)


def test_reserve_preallocates_without_changing_the_cache():
    torch.manual_seed(0)
    layer = Attention(32, n_heads=2).eval()
    x = torch.randn(1, 7, 32)
    with torch.no_grad():
        _, state = layer(x[:, :5])
        reserved = state.reserve(40)
        assert reserved.capacity >= 45 and reserved.length == 5
        assert_close("k", state.keys_values()[0], reserved.keys_values()[0], 0.0)
        buffer = reserved.k_t
        y_reserved, after = layer(x[:, 5:], reserved)
        y_plain, _ = layer(x[:, 5:], state)
    assert after.k_t is buffer, "appending within the reserve must not reallocate"
    assert_close("y", y_plain, y_reserved, 1e-6)
    assert state.reserve(0) is state


def test_cache_keeps_keys_transposed_and_refuses_overflow():
    torch.manual_seed(0)
    layer = Attention(32, n_heads=4, n_kv_heads=2).eval()
    with torch.no_grad():
        _, state = layer(torch.randn(3, 6, 32))
    assert state.k_t.shape[:3] == (3, 2, 8) and state.v.shape[:2] == (3, 2)
    assert state.v.shape[3] == 8 and state.k_t.shape[3] == state.capacity >= 6
    keys, values = state.keys_values()
    assert keys.shape == values.shape == (3, 2, 6, 8)
    assert_close("keys", keys, state.k_t[..., :6].transpose(2, 3), 0.0)
    full = state.with_capacity(6)
    with pytest.raises(ValueError, match="7 tokens do not fit 6 slots"):
        full.write(keys[:, :, :1], values[:, :, :1])
