"""The native CPU decode step (zoo.infer.native): which models take it, and that it decodes as
the model's own forward does, state for state and token for token."""

import copy
import importlib

import pytest
import torch

import zoo
from zoo.infer import generate
from zoo.infer.generate import decode_step, fast_decode_step, prefill
from zoo.infer.native import NativeSupport, native_decode_step, native_support

# the module (zoo.infer.generate is also the function's name)
compiled = importlib.import_module("zoo.infer.compiled")


def _model(seed=0, **changes):
    """attention-tiny, with config changes (a Llama-like stack by default)."""
    config = zoo.load_config("attention-tiny")
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return zoo.ZooForCausalLM(config).eval()


VARIANTS = {
    "attention-tiny": {},
    "mqa-gelu-mlp-bias-embed-norm": dict(
        mixer={"type": "attention", "n_heads": 4, "n_kv_heads": 1, "qkv_bias": True,
               "out_bias": True},
        ffn={"type": "mlp"}, embed_norm=True),
    "no-rotary-untied-three-layers": dict(
        mixer={"type": "attention", "n_heads": 2, "rope_theta": None},
        tie_embeddings=False, n_layers=3),
}


def _prompts(lengths, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_native_step_equals_the_models_own_step(variant, caches_equal):
    model = _model(**VARIANTS[variant])
    start = prefill(model, _prompts([9, 9], seed=1))
    start.cache.reserve(8)
    eager_cache = copy.deepcopy(start.cache)
    layout, tensors, ints = start.cache.flatten()
    assert native_support(model, layout, 2) == NativeSupport(ok=True, reason="")
    step = native_decode_step(model, layout, greedy=False)
    tokens = start.logits.argmax(-1)
    for _ in range(6):
        logits, tensors, ints = step(tokens[:, None], tensors, ints)
        expected = decode_step(model, tokens[:, None], eager_cache)
        torch.testing.assert_close(logits, expected, rtol=0, atol=2e-6)
        tokens = expected.argmax(-1)
    caches_equal(layout.unflatten(tensors, ints), eager_cache)


def test_native_generation_equals_eager_on_ragged_batches_with_stops_and_sampling():
    model = _model(**VARIANTS["mqa-gelu-mlp-bias-embed-norm"])
    prompts = _prompts([3, 8, 5], seed=2)
    stop = generate(model, prompts, max_new_tokens=9).tokens[1][2]
    for kwargs in (dict(stop_tokens=[stop]), dict(temperature=0.9, top_k=20, seed=5),
                   dict(repetition_penalty=1.3)):
        expected = generate(model, prompts, max_new_tokens=9, **kwargs)
        got = generate(model, prompts, max_new_tokens=9, compile="native", **kwargs)
        assert got.tokens == expected.tokens
        assert got.finish_reasons == expected.finish_reasons


def test_compile_true_takes_the_native_step_where_it_applies(monkeypatch):
    def no_inductor(*args, **kwargs):
        raise AssertionError("torch.compile's step was asked for")

    monkeypatch.setattr(compiled, "compiled_decode_step", no_inductor)
    model = _model()
    prompts = _prompts([4, 6], seed=3)
    assert generate(model, prompts, max_new_tokens=5, compile=True).tokens == generate(
        model, prompts, max_new_tokens=5).tokens


def test_other_models_take_torch_compile_and_say_why_not_native(monkeypatch):
    monkeypatch.setattr(compiled, "compiled_decode_step", lambda *args: "inductor step")
    torch.manual_seed(0)
    mamba = zoo.ZooForCausalLM(zoo.load_config("mamba-tiny")).eval()
    start = prefill(mamba, [[1, 2, 3]])
    layout = start.cache.flatten()[0]
    assert fast_decode_step(mamba, layout, False, 1, True) == "inductor step"
    support = native_support(mamba, layout, 1)
    assert not support and "layer 0's mixer is Mamba" in support.reason
    with pytest.raises(ValueError, match="compile='native' does not apply to this model: "
                       "layer 0's mixer is Mamba"):
        fast_decode_step(mamba, layout, False, 1, "native")


@pytest.mark.parametrize(("change", "reason"), [
    (dict(mixer={"type": "attention", "n_heads": 4, "window": 4}),
     "layer 0's attention has a window"),
    (dict(norm="layer"), "norm='layer': the native step has RMSNorm only"),
    (dict(mixer={"type": "attention", "n_heads": 4, "head_dim": 15, "rope_theta": None}),
     "head_dim=15: the native step takes even head dims"),
    (dict(layers=[{"at": [1], "ffn": {"type": "mlp"}}]), "mix SwiGLU and MLP"),
])
def test_unsupported_stacks_are_named(change, reason):
    model = _model(**change)
    layout = prefill(model, [[1, 2]]).cache.flatten()[0]
    assert reason in native_support(model, layout, 1).reason


def test_large_batches_and_float64_are_left_to_torch_compile():
    model = _model()
    layout = prefill(model, [[1, 2]]).cache.flatten()[0]
    assert "batch 17 > 16 rows" in native_support(model, layout, 17).reason
    model.double()
    assert "torch.float64" in native_support(model, layout, 1).reason


def test_bfloat16_model_decodes_natively_close_to_eager():
    model = _model().to(torch.bfloat16)
    prompts = _prompts([6], seed=4)
    with torch.no_grad():
        start = prefill(model, prompts)
        start.cache.reserve(2)
        eager_cache = copy.deepcopy(start.cache)
        layout, tensors, ints = start.cache.flatten()
        tokens = start.logits.float().argmax(-1)
        logits, _, _ = native_decode_step(model, layout, False)(tokens[:, None], tensors, ints)
        expected = decode_step(model, tokens[:, None], eager_cache)
    assert logits.dtype == torch.bfloat16
    # eager rounds every activation to bfloat16; the native step keeps them in float32
    assert (logits.float() - expected.float()).abs().max() <= 0.05 * expected.float().abs().max()


def test_a_bad_compile_mode_is_named():
    with pytest.raises(ValueError, match=r"compile='fast' is not one of \(False, True, "
                       r"'inductor', 'native'\)"):
        generate(_model(), [1, 2], max_new_tokens=2, compile="fast")
