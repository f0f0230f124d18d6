"""Attention's KV cache in int8 (per token) and int4 (KIVI: keys per channel in groups of
tokens, values per token, the newest tokens exact): what it stores, what decoding reads from it,
and what a model decodes with it."""

import copy

import pytest
import torch

from zoo import load_config
from zoo.config import ConfigError
from zoo.kernels.decode_attention import decode_attention
from zoo.layers.attention import (
    KV_GROUP_SIZE,
    KV_RESIDUAL,
    Attention,
    QuantizedAttentionState,
    apply_kv_cache,
)
from zoo.model import ZooForCausalLM
from zoo.testing import assert_close, relative_error

D_MODEL = 64


def _mixers(kv_format: str, head_dim: int = 16) -> tuple[Attention, Attention]:
    """A float-cache attention layer and the same weights with a `kv_format` cache."""
    torch.manual_seed(0)
    float_cache = Attention(D_MODEL, n_heads=4, n_kv_heads=2, head_dim=head_dim).eval()
    quantised = copy.deepcopy(float_cache)
    quantised.kv_cache = kv_format
    return float_cache, quantised


@torch.no_grad()
def test_int8_cache_holds_every_element_within_half_its_tokens_scale():
    float_cache, quantised = _mixers("int8")
    x = torch.randn(2, 50, D_MODEL)
    _, exact = float_cache(x)
    _, state = quantised(x)
    assert isinstance(state, QuantizedAttentionState) and state.length == 50
    keys, values = exact.keys_values()
    got_keys, got_values = state.dequantized(torch.float32)
    L = state.length
    for name, want, got, scales in (("keys", keys, got_keys, state.k_scales[..., :L]),
                                    ("values", values, got_values, state.v_scales[..., :L])):
        bound = scales[..., None] / 2 * (1 + 1e-5)  # (B, H, L, 1): per token and head
        excess = ((want - got).abs() - bound).max()
        assert excess <= 0, f"int8 {name}: an element is {excess:.2e} beyond scale / 2"


@torch.no_grad()
def test_int4_cache_holds_keys_per_channel_group_values_per_token_the_newest_exactly():
    float_cache, quantised = _mixers("int4")
    T = KV_RESIDUAL + 3 * KV_GROUP_SIZE + 5  # three groups quantised, the rest waits
    x = torch.randn(2, T, D_MODEL)
    _, exact = float_cache(x)
    _, state = quantised(x)
    assert state.length == 3 * KV_GROUP_SIZE and state.residual_length == T - state.length
    assert state.residual_length >= KV_RESIDUAL
    keys, values = exact.keys_values()
    got_keys, got_values = state.dequantized(torch.float32)
    n, G = state.length, KV_GROUP_SIZE
    B, H, _, D = keys.shape
    # keys: one scale per (channel, group of G tokens)
    key_bound = state.k_scales[..., : n // G].transpose(2, 3).repeat_interleave(G, dim=2) / 2
    excess = ((keys[:, :, :n] - got_keys[:, :, :n]).abs() - key_bound * (1 + 1e-5)).max()
    assert excess <= 0, f"int4 keys: an element is {excess:.2e} beyond its group's scale / 2"
    value_bound = state.v_scales[..., :n, None] / 2
    excess = ((values[:, :, :n] - got_values[:, :, :n]).abs() - value_bound * (1 + 1e-5)).max()
    assert excess <= 0, f"int4 values: an element is {excess:.2e} beyond its token's scale / 2"
    assert torch.equal(keys[:, :, n:], got_keys[:, :, n:]), "the residual's keys must be exact"
    assert torch.equal(values[:, :, n:], got_values[:, :, n:])


@torch.no_grad()
def test_int4_cache_quantises_a_group_when_the_residual_fills_while_decoding():
    _, quantised = _mixers("int4")
    _, state = quantised(torch.randn(1, KV_RESIDUAL + KV_GROUP_SIZE - 1, D_MODEL))
    assert state.length == 0, "R + G - 1 tokens all wait in the residual"
    _, state = quantised(torch.randn(1, 1, D_MODEL), state)
    assert (state.length, state.residual_length) == (KV_GROUP_SIZE, KV_RESIDUAL)


@torch.no_grad()
def test_int4_chunks_after_a_cache_still_all_residual_attend_to_it_exactly():
    """A prompt fed in chunks before any group is quantised: every cached token is exact, so
    the outputs are the float cache's (this raised on a cache with no quantised token)."""
    float_cache, quantised = _mixers("int4")
    x = torch.randn(2, 30, D_MODEL)
    _, exact_state = float_cache(x[:, :20])
    _, state = quantised(x[:, :20])
    expected, _ = float_cache(x[:, 20:], exact_state)
    got, state = quantised(x[:, 20:], state)
    assert state.length == 0 and state.residual_length == 30
    assert_close("chunk after the residual", expected, got, 1e-6)


@pytest.mark.parametrize("kv_format", ["int8", "int4"])
@torch.no_grad()
def test_decoding_reads_the_quantised_cache_as_a_float_cache_of_its_values(kv_format):
    """The decode step over codes equals the float decode step over the cache dequantised
    (float32 sums: to rounding), so the C++ int8 kernel reads what the cache stands for."""
    float_cache, quantised = _mixers(kv_format)
    _, state = quantised(torch.randn(2, 150, D_MODEL))
    token = torch.randn(2, 1, D_MODEL)
    y, new_state = quantised(token, state)
    keys, values = new_state.dequantized(torch.float32)
    reference = float_cache.init_state(2, capacity=keys.shape[2]).write(
        keys[:, :, :-1], values[:, :, :-1])
    reference = float_cache._append(reference, keys[:, :, -1:], values[:, :, -1:])
    q, _ = float_cache._queries_keys(token, state.position)
    expected = decode_attention(q.reshape(2, 4, 16), reference.k_t[..., : reference.length],
                                reference.v[:, :, : reference.length], backend="reference")
    expected = float_cache.o_proj(expected.reshape(2, 1, 64))
    assert_close(f"{kv_format} decode step", expected, y, 1e-5)


# Output error of 40 decode steps after a 150-token prompt, relative to the output's scale, on
# random weights and inputs: measured 0.0064 (int8) and 0.051 (int4); bounds with headroom.
OUTPUT_BOUNDS = {"int8": 0.02, "int4": 0.2}


@pytest.mark.parametrize("kv_format", ["int8", "int4"])
@torch.no_grad()
def test_attention_output_over_a_quantised_cache_is_within_its_bound(kv_format):
    float_cache, quantised = _mixers(kv_format)
    x = torch.randn(1, 190, D_MODEL)
    _, exact_state = float_cache(x[:, :150])
    _, state = quantised(x[:, :150])
    exact, got = [], []
    for t in range(150, 190):
        y, exact_state = float_cache(x[:, t : t + 1], exact_state)
        exact.append(y)
        y, state = quantised(x[:, t : t + 1], state)
        got.append(y)
    error = relative_error(torch.cat(exact, 1), torch.cat(got, 1))
    print(f"{kv_format}: decode output relative error {error:.3e}")
    assert error <= OUTPUT_BOUNDS[kv_format], f"{kv_format}: relative error {error:.3e}"


def _greedy(model: ZooForCausalLM, prompt: torch.Tensor, steps: int) -> list[int]:
    cache = model.new_cache()
    logits = model(prompt, cache=cache).logits[:, -1]
    tokens = []
    for _ in range(steps):
        token = logits.argmax(-1, keepdim=True)
        tokens.append(token.item())
        logits = model(token, cache=cache).logits[:, -1]
    return tokens


@pytest.mark.parametrize("name", ["attention-tiny", "gated-deltanet-hybrid-tiny"])
@torch.no_grad()
def test_greedy_decode_with_a_quantised_cache_keeps_the_float_caches_tokens(name):
    """32 greedy steps after a 128-token prompt (the int4 residual past R + G: groups are
    quantised). Larger random weights than the default (initializer_range 0.2) so the top two
    logits are apart (min margin 4.7 and 0.29 here) and a tie does not decide the test."""
    torch.manual_seed(0)
    model = ZooForCausalLM(load_config(name, initializer_range=0.2)).eval()
    prompt = torch.randint(0, 256, (1, 128))
    expected = _greedy(model, prompt, 32)
    for kv_format in ("int8", "int4"):
        apply_kv_cache(model, kv_format)
        got = _greedy(model, prompt, 32)
        diverged = [i for i, (a, b) in enumerate(zip(expected, got)) if a != b]
        print(f"{name} kv_cache={kv_format}: first divergence "
              f"{diverged[0] if diverged else 'none'} of 32")
        assert got == expected, f"{name} kv_cache={kv_format}: tokens differ from step {diverged}"


@pytest.mark.parametrize("kv_format", ["int8", "int4"])
@torch.no_grad()
def test_state_bytes_are_the_codes_scales_and_residual(kv_format):
    float_cache, quantised = _mixers(kv_format, head_dim=64)
    for T in (1, 40, KV_RESIDUAL + KV_GROUP_SIZE, 300):
        _, state = quantised(torch.randn(1, T, D_MODEL))
        _, exact = float_cache(torch.randn(1, T, D_MODEL))
        assert state.nbytes() == quantised.state_size(T), f"{kv_format}, {T} tokens"
        assert exact.nbytes() == float_cache.state_size(T)
    # int8 in a float32 model: a byte per element and a float32 scale per 64: 68 / 256
    ratio = state.nbytes() / exact.nbytes()
    expected = 68 / 256 if kv_format == "int8" else None
    if expected is not None:
        assert ratio == pytest.approx(expected)
    else:  # 300 tokens: 224 quantised (half a byte, plus pairs per group and token), 76 exact
        assert ratio < 0.4


def test_kv_cache_bad_values_name_the_field_and_the_choices():
    with pytest.raises(ConfigError, match=r"kv_cache='int3' is not one of \('float', 'int8', "
                                          r"'int4'\)"):
        load_config("attention-tiny", kv_cache="int3")
    with pytest.raises(ConfigError, match=r"kv_cache='int8' .*window=8"):
        load_config("attention-tiny", kv_cache="int8",
                    mixer={"type": "attention", "n_heads": 4, "window": 8})
    with pytest.raises(ValueError, match=r"kv_cache='int2' is not one of"):
        Attention(D_MODEL).kv_cache = "int2"


def test_a_quantised_cache_refuses_a_padding_mask_by_name():
    _, quantised = _mixers("int8")
    x = torch.randn(2, 5, D_MODEL)
    with pytest.raises(ValueError, match=r"kv_cache='int8' takes no padding_mask"):
        quantised(x, padding_mask=torch.ones(2, 5, dtype=torch.bool))


def test_the_native_step_declines_a_quantised_cache_naming_it():
    from zoo.infer.native import native_support

    model = ZooForCausalLM(load_config("attention-tiny")).eval()
    apply_kv_cache(model, "int8")
    support = native_support(model, model.new_cache().flatten()[0], 1)
    assert not support and "kv_cache" in support.reason and "int8" in support.reason


@torch.no_grad()
def test_kv_cache_survives_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = ZooForCausalLM(load_config("attention-tiny", kv_cache="int8")).eval()
    model.save_pretrained(tmp_path)
    loaded = ZooForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.kv_cache == "int8"
    # the config alone sets every attention layer's cache format, built or loaded
    assert model.model.layers[0].mixer.kv_cache == loaded.model.layers[0].mixer.kv_cache == "int8"
    prompt = torch.randint(0, 256, (1, 20))
    assert _greedy(loaded, prompt, 8) == _greedy(model, prompt, 8)


@pytest.mark.parametrize("kv_format", ["int8", "int4"])
@torch.no_grad()
def test_a_quantised_cache_reorders_by_row_as_beam_search_asks(kv_format):
    """index_select (beam search, finished rows) keeps each row's codes, scales and residual:
    a reordered batch decodes as its rows did."""
    _, quantised = _mixers(kv_format)
    _, state = quantised(torch.randn(3, 120, D_MODEL))
    token = torch.randn(3, 1, D_MODEL)
    expected, _ = quantised(token, state.clone())
    rows = torch.tensor([2, 0])
    got, _ = quantised(token[rows], state.index_select(rows))
    assert_close(f"{kv_format} reordered rows", expected[rows], got, 1e-6)
