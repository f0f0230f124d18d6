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


def _qwen3_next_attention(bias: bool):
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import (
        Qwen3NextAttention,
        Qwen3NextRotaryEmbedding,
    )

    config = Qwen3NextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=16, attention_bias=bias, num_hidden_layers=4)
    config._attn_implementation = "eager"  # it returns its softmax weights
    torch.manual_seed(0)
    layer = Qwen3NextAttention(config, 3).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer, Qwen3NextRotaryEmbedding(config)


def _from_qwen3_next(layer) -> dict[str, torch.Tensor]:
    """q_proj holds per head its 16 query rows, then its 16 gate rows; the norms store w for
    1 + w."""
    mine = {}
    for name, tensor in layer.state_dict().items():
        if name.startswith("q_proj."):
            query, gate = tensor.view(4, 32, *tensor.shape[1:]).split([16, 16], 1)
            mine[name] = query.reshape(64, *tensor.shape[1:])
            mine[name.replace("q_proj", "g_proj")] = gate.reshape(64, *tensor.shape[1:])
        else:
            mine[name] = tensor + 1 if name.endswith("_norm.weight") else tensor
    return mine


@pytest.mark.parametrize("bias", [False, True])
@torch.no_grad()
def test_gated_attention_equals_transformers_qwen3_next_attention(bias):
    """q/k norms, the output gate and rotary on a quarter of each head, as Qwen3-Next lays
    them out: the same output and the same softmax weights (what attention transfer reads)."""
    layer, rotary = _qwen3_next_attention(bias)
    ours = Attention(64, n_heads=4, n_kv_heads=2, head_dim=16, qk_norm=True, output_gate=True,
                     partial_rotary_factor=0.25, qkv_bias=bias, out_bias=bias).eval()
    ours.load_state_dict(_from_qwen3_next(layer), strict=True)
    x = torch.randn(2, 13, 64)
    causal = torch.zeros(13, 13).masked_fill(torch.ones(13, 13).triu(1).bool(), -torch.inf)
    want, want_weights = layer(x, rotary(x, torch.arange(13)[None]), causal[None, None])
    y, _ = ours(x)
    assert_close("gated attention vs Qwen3NextAttention", want, y, 1e-5)
    assert_close("softmax weights", want_weights, ours.attention_weights(x), 1e-5)


def test_the_defaults_are_the_plain_layout_and_the_options_a_type_of_their_own():
    plain = Attention(64, n_heads=4)
    assert type(plain) is Attention
    assert plain.q_norm is plain.k_norm is plain.g_proj is None
    assert plain.rotary.head_dim == 16
    gated = Attention(64, n_heads=4, output_gate=True)
    # the native decode step takes only `type(mixer) is Attention`
    assert type(gated).__name__ == "QwenAttention" and isinstance(gated, Attention)
    assert Attention(64, n_heads=2, partial_rotary_factor=0.5).rotary.head_dim == 16


@pytest.mark.parametrize("factor,match", [
    (0.2, r"partial_rotary_factor=0.2 of head_dim=16 rotates 3 channels; rotary pairs need an "
          r"even number >= 2"),
    (0.05, r"partial_rotary_factor=0.05 of head_dim=16 rotates 0 channels"),
])
def test_a_partial_rotary_that_leaves_no_pairs_is_named(factor, match):
    assert Attention(64, n_heads=4, partial_rotary_factor=0.3).rotary.head_dim == 4  # int(4.8)
    with pytest.raises(ValueError, match=match):
        Attention(64, n_heads=4, partial_rotary_factor=factor)


@pytest.mark.parametrize("value", [0.0, 1.5])
def test_partial_rotary_factor_outside_its_range_is_a_config_error(value):
    from zoo.config import ConfigError, ZooConfig

    with pytest.raises(ConfigError, match=rf"config.mixer.partial_rotary_factor={value} must be "
                       r"a finite number in \(0, 1\]"):
        ZooConfig(mixer={"type": "attention", "partial_rotary_factor": value})
