"""ZooCache: taken apart into plain values for the compiled decode step and put back, and
reordered for transformers' beam search."""

import dataclasses

import pytest
import torch

import zoo

TINY = [name for name in zoo.shipped_configs() if name.endswith("-tiny")]


def _model(name):
    torch.manual_seed(0)
    return zoo.ZooForCausalLM(zoo.load_config(name)).eval()


def _ids(model, B, T, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (B, T), generator=generator)


def _prefilled(model, B=2, T=6):
    ids = _ids(model, B, T, seed=1)
    with torch.no_grad():
        return ids, model(ids, use_cache=True).cache


@pytest.mark.parametrize("name", TINY)
def test_flatten_then_unflatten_gives_back_every_field(name):
    model = _model(name)
    _, cache = _prefilled(model)
    layout, tensors, ints = cache.flatten()
    assert ints[0] == cache.seen_tokens == 6
    assert all(isinstance(t, torch.Tensor) for t in tensors)
    assert all(type(i) is int for i in ints)
    rebuilt = layout.unflatten(tensors, ints)
    assert rebuilt.seen_tokens == cache.seen_tokens
    for old_layer, new_layer in zip(cache.layers, rebuilt.layers):
        for old, new in zip(old_layer, new_layer):
            assert type(old) is type(new)
            if old is None:
                continue
            for field in dataclasses.fields(old):
                before, after = getattr(old, field.name), getattr(new, field.name)
                assert after is before if isinstance(before, torch.Tensor) else after == before
    assert rebuilt.flatten()[0] == layout
    assert hash(layout) == hash(rebuilt.flatten()[0])  # compiled steps are kept per layout


def test_the_layout_stays_while_lengths_move_to_the_ints():
    model = _model("attention-tiny")
    ids, cache = _prefilled(model)
    layout, _, ints = cache.flatten()
    with torch.no_grad():
        model(ids[:, :1], cache=cache, use_cache=True)
    later_layout, _, later_ints = cache.flatten()
    assert later_layout == layout
    assert later_ints[0] == ints[0] + 1
    assert later_ints != ints  # seen_tokens, and each layer's length and position


@pytest.mark.parametrize("name", ["attention-tiny", "mamba-tiny", "rwkv4-tiny"])
def test_reorder_cache_picks_rows_as_beam_search_asks(name):
    model = _model(name)
    _, cache = _prefilled(model, B=3)
    expected = cache.index_select(torch.tensor([2, 2, 0]))
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    for got_layer, want_layer in zip(cache.layers, expected.layers):
        for got, want in zip(got_layer, want_layer):
            if got is not None:
                for a, b in zip(_filled(got), _filled(want)):
                    assert torch.equal(a, b)


def _filled(state) -> list[torch.Tensor]:
    """The tensors that hold values: a KV cache's slots past its length are uninitialised
    (NaN there would never compare equal)."""
    return list(state.keys_values()) if hasattr(state, "keys_values") else state.tensors()


@pytest.mark.parametrize("name", ["attention-tiny", "mamba-tiny"])
def test_transformers_beam_search_with_the_cache_equals_it_without(name):
    model = _model(name)
    ids = _ids(model, 1, 5, seed=2)
    kwargs = dict(num_beams=3, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with_cache = model.generate(ids, use_cache=True, **kwargs)
    without = model.generate(ids, use_cache=False, **kwargs)
    assert with_cache.tolist() == without.tolist()
