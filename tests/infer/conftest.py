"""Shared helpers for the inference tests: tiny models and a state comparison."""

import dataclasses

import pytest
import torch

import zoo
from zoo.layers.attention import AttentionState
from zoo.layers.hyena import HyenaState
from zoo.layers.mla import MLAState


def tiny_model(name: str, seed: int = 0) -> zoo.ZooForCausalLM:
    torch.manual_seed(seed)
    return zoo.ZooForCausalLM(zoo.load_config(name)).eval()


def _logical_tensors(state) -> dict:
    """The tensors that define a state's meaning: the filled part of append-only buffers."""
    if isinstance(state, AttentionState):
        k, v = state.keys_values()
        return {"k": k, "v": v}
    if isinstance(state, HyenaState):
        return {"conv": state.conv, "inputs": state.inputs[:, :, : state.length]}
    if isinstance(state, MLAState):
        return {"latent": state.filled()}
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
            if isinstance(getattr(state, f.name), torch.Tensor)}


def _scalars(state) -> dict:
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
            if not isinstance(getattr(state, f.name), torch.Tensor)}


def assert_caches_equal(a: zoo.ZooCache, b: zoo.ZooCache, atol: float = 1e-5) -> None:
    assert len(a) == len(b)
    for i, (layer_a, layer_b) in enumerate(zip(a.layers, b.layers)):
        for which, sa, sb in zip(("mixer", "ffn"), layer_a, layer_b):
            assert type(sa) is type(sb), f"layer {i} {which}: {type(sa)} vs {type(sb)}"
            if sa is None:
                continue
            assert _scalars(sa) == _scalars(sb), f"layer {i} {which} fields differ"
            ta, tb = _logical_tensors(sa), _logical_tensors(sb)
            for name in ta:
                torch.testing.assert_close(
                    ta[name], tb[name], atol=atol, rtol=1e-4,
                    msg=lambda m, where=f"layer {i} {which}.{name}": f"{where}: {m}",
                )


@pytest.fixture
def caches_equal():
    return assert_caches_equal


@pytest.fixture
def make_model():
    return tiny_model
