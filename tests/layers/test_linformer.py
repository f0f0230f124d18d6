"""Linformer: the causal bounded-memory (ABC-style) mixer registered as `linformer` against its
token-by-token definition, its bounded state, the refusal of the bidirectional form as a causal
mixer, and the paper's bidirectional module on its own (the contract suite covers the registered
mixer's state contract)."""

import pytest
import torch

from zoo.layers import build_mixer, validate_mixer_spec
from zoo.layers.bounded_memory_attention import (
    bounded_memory_attention_chunked,
    bounded_memory_attention_reference,
)
from zoo.layers.linformer import LinformerSelfAttention
from zoo.testing import assert_close


def _inputs(B=2, T=45, H=3, D=8, n=5, dtype=torch.float64):
    q, k, v = (torch.randn(B, T, H, D, dtype=dtype) for _ in range(3))
    control = torch.randn(B, T, H, n, dtype=dtype).mul(3).softmax(-1)
    state = (
        torch.randn(B, H, n, D, dtype=dtype),
        torch.randn(B, H, n, D, dtype=dtype),
        torch.rand(B, H, n, dtype=dtype) + 0.5,
    )
    return q, k, v, control, state


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_reference(chunk_size, with_state):
    q, k, v, control, state = _inputs()
    state = state if with_state else None
    o_ref, s_ref = bounded_memory_attention_reference(q, k, v, control, 0.35, state)
    o, s = bounded_memory_attention_chunked(q, k, v, control, 0.35, state, chunk_size)
    assert_close("o", o_ref, o, 1e-10)
    for name, a, b in zip(("keys", "values", "control"), s_ref, s):
        assert_close(name, a, b, 1e-10)


def test_chunked_gradients_match_reference():
    inputs = [t.requires_grad_() for t in _inputs(T=20)[:4]]
    grads = []
    for fn, extra in ((bounded_memory_attention_reference, ()),
                      (bounded_memory_attention_chunked, (6,))):
        o, (keys, values, control) = fn(*inputs, 0.5, None, *extra)
        loss = (o * torch.linspace(-1, 1, o.shape[1], dtype=o.dtype)[:, None, None]).sum()
        loss = loss + keys.sin().sum() + values.cos().sum() + control.square().sum()
        grads.append(torch.autograd.grad(loss, inputs))
    for name, a, b in zip(("dq", "dk", "dv", "dcontrol"), *grads):
        assert_close(name, a, b, 1e-10)


def test_reading_is_softmax_over_control_weighted_slot_averages():
    """With one-hot controls each slot holds the plain mean of the keys/values routed to it."""
    B, T, H, D, n = 1, 6, 1, 4, 2
    q, k, v = (torch.randn(B, T, H, D, dtype=torch.float64) for _ in range(3))
    route = torch.tensor([0, 1, 0, 0, 1, 1])
    control = torch.nn.functional.one_hot(route, n).double()[None, :, None, :]
    o, _ = bounded_memory_attention_chunked(q, k, v, control, 1.0)
    t = 4  # slots after tokens 0..4: slot 0 = tokens {0, 2, 3}, slot 1 = tokens {1, 4}
    slot_k = torch.stack([k[0, [0, 2, 3], 0].mean(0), k[0, [1, 4], 0].mean(0)])
    slot_v = torch.stack([v[0, [0, 2, 3], 0].mean(0), v[0, [1, 4], 0].mean(0)])
    expected = (q[0, t, 0] @ slot_k.T).softmax(-1) @ slot_v
    assert_close("o_4", expected, o[0, t, 0], 1e-12)


def test_state_is_k_slots_by_head_dim_whatever_the_length():
    mixer = build_mixer({"type": "linformer", "n_heads": 4, "k_slots": 8}, 64)
    for T in (3, 200):
        _, state = mixer(torch.randn(1, T, 64))
        assert state.keys.shape == state.values.shape == (1, 4, 8, 16)
        assert state.control.shape == (1, 4, 8)
    assert mixer.state_size(10) == mixer.state_size(10**6) == 4 * 4 * 8 * (2 * 16 + 1)


def test_bidirectional_spec_is_refused_with_the_reason_and_the_way_out():
    validate_mixer_spec({"type": "linformer", "causal": False})  # a known option...
    with pytest.raises(ValueError) as info:  # ...that a causal mixer cannot honour
        build_mixer({"type": "linformer", "causal": False}, 64)
    message = str(info.value)
    assert "causal=False" in message
    assert "future" in message and "causal language-model mixer" in message
    assert "LinformerSelfAttention" in message and "causal: true" in message


def test_bidirectional_module_shapes_and_projection_sizes():
    module = LinformerSelfAttention(32, n_heads=4, max_seq_len=50, k_slots=6)
    assert module.E.shape == module.F.shape == (6, 50)
    for T in (50, 17):
        assert module(torch.randn(3, T, 32)).shape == (3, T, 32)
    shared = LinformerSelfAttention(32, n_heads=4, max_seq_len=50, k_slots=6, share_kv=True)
    assert shared.F is None
    with pytest.raises(ValueError, match="max_seq_len=50"):
        module(torch.randn(1, 51, 32))


def test_bidirectional_module_is_not_causal():
    torch.manual_seed(0)
    module = LinformerSelfAttention(32, n_heads=4, max_seq_len=20, k_slots=6)
    x = torch.randn(1, 20, 32)
    changed = x.clone()
    changed[:, -1] += 1.0  # change only the last token
    y, y_changed = module(x), module(changed)
    assert (y[:, 0] - y_changed[:, 0]).abs().max() > 1e-4, "first output ignores the future"


def test_bidirectional_module_padding_mask_hides_padded_tokens():
    torch.manual_seed(0)
    module = LinformerSelfAttention(32, n_heads=2, max_seq_len=12, k_slots=4)
    x = torch.randn(2, 12, 32)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[:, 9:] = False
    other = x.clone()
    other[:, 9:] = torch.randn(2, 3, 32)  # different padding content
    assert_close("padded", module(x, mask)[:, :9], module(other, mask)[:, :9], 1e-6)


def test_causal_mixer_output_does_not_see_the_future():
    torch.manual_seed(0)
    mixer = build_mixer({"type": "linformer", "n_heads": 2, "k_slots": 4, "chunk_size": 8}, 64)
    x = torch.randn(1, 30, 64)
    changed = x.clone()
    changed[:, 20:] += 1.0
    y, y_changed = mixer(x)[0], mixer(changed)[0]
    assert_close("past outputs", y[:, :20], y_changed[:, :20], 1e-6)
    assert (y[:, 20:] - y_changed[:, 20:]).abs().max() > 1e-4
