"""The native C++ decode step on quantised models: on its float path it reads int8 and int4 codes
(dequantised in registers) and decodes as the eager step on the same quantised model does,
logits to summation order and greedy tokens identical; on its integer path (int8_dots.h: inputs
quantised to int8 blocks of 32, AVX-512 VNNI dot products) it equals the eager step whose
quantised linears see the same quantised inputs, and keeps the eager tokens wherever their
margin exceeds what that input quantisation moves the logits; native_support takes what the
kernel reads and names what it does not."""

import copy
import importlib

import pytest
import torch
from torch import nn

import zoo
from zoo.compression import QuantizedLinear, quantize_int4, quantize_model
from zoo.infer import generate
from zoo.infer.generate import decode_step, fast_decode_step, prefill
from zoo.infer.native import MAX_NATIVE_BATCH, native_decode_step, native_support
from zoo.kernels.transformer_step import (
    GLOBAL_FIELDS,
    LAYER_FIELDS,
    int8_dots,
    transformer_decode_step,
)
from zoo.testing import assert_close

compiled = importlib.import_module("zoo.infer.compiled")

# float32 logits of the native step and the eager one differ by summation order only: the
# kernel sums a group's codes times inputs, then scales (and adds zero * the group's input sum)
LOGITS_ATOL = 2e-5
FORMATS = [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)]
ACTIVATION_BLOCK = 32  # inputs per scale of the integer path's int8 inputs


@pytest.fixture(autouse=True)
def float_products():
    """Every test here runs the kernel's float path unless it turns the integer path on; the
    process's setting comes back after it."""
    before = int8_dots(False)
    yield
    int8_dots(before)


def _smollm2_shaped(seed=0, **changes):
    """A tiny Llama / SmolLM2-shaped stack: GQA with 64-wide heads, SwiGLU, RMSNorm, rotary
    (theta 1e5), tied embeddings; widths every int4 group size divides."""
    config = zoo.load_config("attention-tiny")
    config.d_model, config.n_layers = 128, 2
    config.mixer = {"type": "attention", "n_heads": 2, "n_kv_heads": 1, "rope_theta": 100000.0}
    config.ffn = {"type": "swiglu", "hidden_size": 256}
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = zoo.ZooForCausalLM(config).eval()
    with torch.no_grad():  # weights of a trained model's scale, so logits spread like one's
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.08)
    return model


def _quantized(weights, group_size, skip=(), **changes):
    model = _smollm2_shaped(**changes)
    quantize_model(model, weights, group_size, skip=skip)
    return model


def _prompts(lengths, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _assert_kv_caches_equal(a, b):
    """The filled keys and values of two caches of attention layers, layer by layer."""
    for i, (layer_a, layer_b) in enumerate(zip(a.layers, b.layers, strict=True)):
        for name, x, y in zip("kv", layer_a[0].keys_values(), layer_b[0].keys_values()):
            assert_close(f"layer {i} {name}", x, y, 1e-5)


@torch.no_grad()
def _native_against_eager(model, prompts, steps):
    """Run the native step and the eager step side by side, each from its own cache, feeding
    both the eager step's greedy tokens; assert logits and tokens agree at every step."""
    start = prefill(model, prompts)
    start.cache.reserve(steps + 1)
    eager_cache = copy.deepcopy(start.cache)
    layout, tensors, ints = start.cache.flatten()
    assert native_support(model, layout, len(prompts)), native_support(
        model, layout, len(prompts)).reason
    step = native_decode_step(model, layout, greedy=False)
    greedy_step = native_decode_step(model, layout, greedy=True)
    tokens = start.logits.float().argmax(-1)
    for _ in range(steps):
        before = [t.clone() for t in tensors]
        greedy_tokens, _, _ = greedy_step(tokens[:, None], before, ints)
        logits, tensors, ints = step(tokens[:, None], tensors, ints)
        expected = decode_step(model, tokens[:, None], eager_cache)
        torch.testing.assert_close(logits, expected, rtol=0, atol=LOGITS_ATOL)
        tokens = expected.argmax(-1)
        assert torch.equal(logits.argmax(-1), tokens)
        assert torch.equal(greedy_tokens, tokens)
    _assert_kv_caches_equal(layout.unflatten(tensors, ints), eager_cache)


@pytest.mark.parametrize(("weights", "group_size"), FORMATS)
def test_native_step_equals_the_eager_step_on_a_quantised_model(weights, group_size):
    model = _quantized(weights, group_size)
    assert isinstance(model.lm_head, QuantizedLinear)
    _native_against_eager(model, _prompts([5, 9, 3], seed=1), steps=16)


@pytest.mark.parametrize(("weights", "group_size"), [("int8", None), ("int4", 32)])
def test_batches_up_to_the_native_limit(weights, group_size):
    """16 rows: four passes of four inputs over every row of codes."""
    model = _quantized(weights, group_size)
    _native_against_eager(model, _prompts(range(1, MAX_NATIVE_BATCH + 1), seed=2), steps=3)


@pytest.mark.parametrize("skip", [("model.layers.0.*", "lm_head"), ("*.o_proj", "*.up_proj")])
def test_mixed_float_and_quantised_linears(skip):
    model = _quantized("int4", 32, skip=skip)
    kinds = {type(m) for m in model.modules() if isinstance(m, (nn.Linear, QuantizedLinear))}
    assert kinds == {QuantizedLinear, zoo.layers.linear.Linear}
    _native_against_eager(model, _prompts([4, 7], seed=3), steps=8)


@torch.no_grad()
def test_grouped_int8_and_int4_on_a_gelu_mlp_with_biases():
    """int8 in groups (GGUF's Q8_0 is int8 in groups of 32), QuantizedLinear biases, GELU."""
    model = _smollm2_shaped(ffn={"type": "mlp", "hidden_size": 256},
                            mixer={"type": "attention", "n_heads": 2, "n_kv_heads": 1,
                                   "qkv_bias": True, "out_bias": True})
    for i, block in enumerate(model.model.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            linear = getattr(block.mixer, name)
            nn.init.normal_(linear.bias, 0, 0.1)
            group = 32 if (i + len(name)) % 2 else 16
            setattr(block.mixer, name, QuantizedLinear.from_linear(linear, "int8", group))
        block.ffn.fc_in = QuantizedLinear.from_linear(block.ffn.fc_in, "int4", 64)
    _native_against_eager(model, _prompts([6, 2], seed=4), steps=8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_quantised_model_decodes_natively_close_to_eager(dtype):
    """Half precision: eager runs torch's weight-only kernels and rounds every activation to
    the dtype; the native step keeps activations in float32."""
    for weights, group_size in (("int8", None), ("int4", 32)):
        model = _quantized(weights, group_size).to(dtype)
        with torch.no_grad():
            start = prefill(model, _prompts([6, 3], seed=5))
            start.cache.reserve(2)
            eager_cache = copy.deepcopy(start.cache)
            layout, tensors, ints = start.cache.flatten()
            assert native_support(model, layout, 2)
            tokens = start.logits.float().argmax(-1)
            logits, _, _ = native_decode_step(model, layout, False)(tokens[:, None], tensors,
                                                                     ints)
            expected = decode_step(model, tokens[:, None], eager_cache)
        assert logits.dtype == dtype
        error = (logits.float() - expected.float()).abs().max()
        assert error <= 0.03 * expected.float().abs().max(), (weights, float(error))


def test_the_native_step_reads_codes_and_never_dequantises(monkeypatch):
    """A quantised head's `weight` is its whole dequantised matrix: neither the support check
    nor the step may build it (the step reads codes; the check reads the embedding)."""
    model = _quantized("int4", 32)
    with torch.no_grad():
        start = prefill(model, [[1, 2, 3]])
    start.cache.reserve(1)
    layout, tensors, ints = start.cache.flatten()

    def no_dequantising(self, dtype=None):
        raise AssertionError("a QuantizedLinear was dequantised")

    monkeypatch.setattr(QuantizedLinear, "dequantize", no_dequantising)
    assert native_support(model, layout, 1)
    tokens, _, _ = native_decode_step(model, layout, greedy=True)(torch.tensor([[7]]), tensors,
                                                                   ints)
    assert tokens.shape == (1,)


def test_generate_compile_true_takes_the_native_step_on_a_quantised_model(monkeypatch):
    def no_inductor(*args, **kwargs):
        raise AssertionError("torch.compile's step was asked for")

    monkeypatch.setattr(compiled, "compiled_decode_step", no_inductor)
    for weights, group_size in (("int8", None), ("int4", 32)):
        model = _quantized(weights, group_size)
        prompts = _prompts([4, 6], seed=6)
        expected = generate(model, prompts, max_new_tokens=6)
        assert generate(model, prompts, max_new_tokens=6, compile=True).tokens == expected.tokens
        assert generate(model, prompts, max_new_tokens=6,
                        compile="native").tokens == expected.tokens


def _with(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)
    return model


def _int4_group_16(linear):
    """An int4 layer in groups of 16 (QuantizedLinear stores it; the native step does not)."""
    module = QuantizedLinear(linear.in_features, linear.out_features, bias=False,
                             weights="int4", group_size=16)
    codes, scale, zero = quantize_int4(linear.weight, 16)
    with torch.no_grad():
        module.qweight.copy_(codes)
        module.scale.copy_(scale)
        module.zero.copy_(zero)
    return module


class _WrappedWeight(torch.Tensor):
    """A tensor subclass, as torchao's quantised weights are: its data is not a plain matrix."""


def _subclassed_weight(linear: nn.Module) -> nn.Linear:
    plain = nn.Linear(linear.in_features, linear.out_features, bias=False)
    plain.weight = nn.Parameter(torch.zeros_like(plain.weight).as_subclass(_WrappedWeight))
    return plain


@pytest.mark.parametrize(("change", "reason"), [
    (lambda m: _with(m, "model.layers.0.mixer.q_proj",
                     _subclassed_weight(m.model.layers[0].mixer.q_proj)),
     "layer 0's q_proj holds a _WrappedWeight weight; the native step reads plain tensors"),
    (lambda m: _with(m, "model.layers.1.mixer.k_proj",
                     _int4_group_16(m.model.layers[1].mixer.k_proj)),
     "layer 1's k_proj is int4 in groups of 16; the native step takes int4 groups of a "
     "multiple of 32"),
    (lambda m: _with(m, "model.layers.0.ffn.up_proj", QuantizedLinear.from_linear(
        m.model.layers[0].ffn.up_proj, "int8", 8)),
     "layer 0's up_proj is int8 in groups of 8; the native step takes int8 groups of a "
     "multiple of 16 or per output channel"),
    (lambda m: _with(m, "lm_head", nn.Sequential(m.lm_head)),
     "the output head is Sequential; the native step reads nn.Linear and QuantizedLinear"),
    (lambda m: m.to(torch.float64), "torch.float64"),
])
def test_native_support_names_what_it_cannot_read(change, reason):
    model = change(_quantized("int8", None))
    layout = prefill(model, [[1, 2]]).cache.flatten()[0]
    support = native_support(model, layout, 1)
    assert not support and reason in support.reason
    with pytest.raises(ValueError, match="compile='native' does not apply to this model"):
        fast_decode_step(model, layout, False, 1, "native")


def test_native_support_accepts_quantised_models():
    for weights, group_size in FORMATS:
        model = _quantized(weights, group_size)
        layout = prefill(model, [[1, 2]]).cache.flatten()[0]
        assert native_support(model, layout, MAX_NATIVE_BATCH).reason == ""
        assert "batch 17 > 16 rows" in native_support(model, layout, 17).reason


def _op_arguments(weights, group_size, B=5, d=96, hidden=192, V=41, dtype=torch.float32):
    """The op's arguments for a random two-layer stack whose linears are all quantised: layer
    weights (codes for the linears), globals, caches, scales, zeros and the config."""
    torch.manual_seed(7)
    H, H_kv, D = 3, 1, 32
    layers, scales, zeros = [], [], []

    def quantised(n, k):
        linear = nn.Linear(k, n, bias=False)
        nn.init.normal_(linear.weight, 0, 0.2)
        q = QuantizedLinear.from_linear(linear, weights, group_size).to(dtype)
        return q.qweight, q.scale, q.zero

    shapes = dict(q=(H * D, d), k=(H_kv * D, d), v=(H_kv * D, d), o=(d, H * D),
                  gate=(hidden, d), up=(hidden, d), down=(d, hidden))
    for _ in range(2):
        for field in LAYER_FIELDS:
            if field in shapes:
                codes, scale, zero = quantised(*shapes[field])
            elif field.endswith("norm"):
                codes, scale, zero = (1 + 0.1 * torch.randn(d)).to(dtype), None, None
            else:
                codes, scale, zero = None, None, None
            layers.append(codes)
            scales.append(scale)
            zeros.append(zero)
    head, head_scale, head_zero = quantised(V, d)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    globals_ = dict(embed=torch.randn(V, d).to(dtype), embed_norm=None,
                    final_norm=(1 + 0.1 * torch.randn(d)).to(dtype), head=head,
                    inv_freq=inv_freq)
    for field in GLOBAL_FIELDS:
        scales.append(head_scale if field == "head" else None)
        zeros.append(head_zero if field == "head" else None)
    kv = []
    for _ in range(2):
        kv += [torch.randn(B, H_kv, D, 8).to(dtype), torch.randn(B, H_kv, 8, D).to(dtype)]
    ids = torch.randint(0, V, (B,))
    config = dict(lengths=[3, 6], positions=[3, 6], n_heads=H, n_kv_heads=H_kv, head_dim=D,
                  eps=1e-5, activation="swiglu")
    return ids, layers, [globals_[f] for f in GLOBAL_FIELDS], kv, scales, zeros, config


@pytest.mark.parametrize(("weights", "group_size", "sizes"), [
    ("int8", None, dict(d=72, hidden=168)),  # per channel: rows end in a partial vector
    ("int8", 16, {}), ("int4", 32, {}), ("int4", 96, {}),  # 96: three chunks of 32 a group
])
def test_kernel_equals_its_reference_on_quantised_weights(weights, group_size, sizes):
    """The op against its PyTorch reference (which dequantises first), float32, 5 rows: one
    pass of four inputs over a row of codes, then one of one."""
    ids, layers, globals_, kv, scales, zeros, config = _op_arguments(weights, group_size,
                                                                     **sizes)
    outs = {}
    for backend in ("reference", "cpu"):
        caches = [c.clone() for c in kv]
        outs[backend] = transformer_decode_step(ids, layers, globals_, caches, scales=scales,
                                                zeros=zeros, backend=backend, **config)
        outs[backend + " caches"] = caches
    assert_close("logits", outs["reference"], outs["cpu"], 1e-5)
    for i, (a, b) in enumerate(zip(outs["reference caches"], outs["cpu caches"])):
        assert_close(f"cache {i}", a, b, 1e-5)


def test_kernel_refuses_quantised_arguments_it_cannot_read():
    ids, layers, globals_, kv, scales, zeros, config = _op_arguments("int4", 32)
    with pytest.raises(ValueError, match="scales and zeros must both be None or hold one entry"):
        transformer_decode_step(ids, layers, globals_, kv, scales=scales[:-1], zeros=zeros,
                                backend="cpu", **config)
    q = LAYER_FIELDS.index("q")
    bad_zeros = list(zeros)
    bad_zeros[q] = None
    with pytest.raises(RuntimeError, match="q_proj of layer 0: int4 needs a contiguous"):
        transformer_decode_step(ids, layers, globals_, kv, scales=scales, zeros=bad_zeros,
                                backend="cpu", **config)
    bad_scales = list(scales)
    bad_scales[q] = scales[q].repeat(1, 4)  # groups of 8: fewer codes than one vector holds
    bad_zeros = list(zeros)
    bad_zeros[q] = zeros[q].repeat(1, 4)
    with pytest.raises(RuntimeError, match="q_proj of layer 0: groups of 8 inputs"):
        transformer_decode_step(ids, layers, globals_, kv, scales=bad_scales, zeros=bad_zeros,
                                backend="cpu", **config)


def _quantized_inputs(module, args):
    """A forward pre-hook: the linear's input as the integer path quantises it (blocks of 32
    inputs, scale max|x| / 127, codes rounded half to even), dequantised, in float32."""
    x = args[0]
    blocks = x.float().reshape(*x.shape[:-1], -1, ACTIVATION_BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inverse) * (amax / 127)).reshape(x.shape).to(x.dtype)


# Native integer path vs the eager step with the same input quantisation: both compute
# dequantise(W) . dequantise(quantise(x)), so they differ by summation order, plus the rare input
# whose code rounds the other way after upstream float32 differences (one code step, max|x| / 127
# of its block, times its weight: at most ~1e-3 of a logit here)
INTEGER_LOGITS_ATOL = 2e-3


@pytest.mark.parametrize(("weights", "group_size"), [("int8", None), ("int4", 32)])
@torch.no_grad()
def test_integer_products_decode_as_eager_with_quantised_inputs(weights, group_size):
    int8_dots(True)
    if not int8_dots(None):
        pytest.skip("this build or CPU has no AVX-512 VNNI: the float path is the only one")
    model = _quantized(weights, group_size)
    mimic = copy.deepcopy(model)
    for module in mimic.modules():
        if isinstance(module, QuantizedLinear):
            module.register_forward_pre_hook(_quantized_inputs)
    prompts, steps = _prompts([5, 9, 3], seed=1), 16
    start = prefill(model, prompts)
    start.cache.reserve(steps + 1)
    eager_cache, mimic_cache = copy.deepcopy(start.cache), copy.deepcopy(start.cache)
    layout, tensors, ints = start.cache.flatten()
    step = native_decode_step(model, layout, greedy=False)
    tokens = start.logits.float().argmax(-1)
    compared = 0
    for _ in range(steps):
        logits, tensors, ints = step(tokens[:, None], tensors, ints)
        expected = decode_step(model, tokens[:, None], eager_cache)
        mimicked = decode_step(mimic, tokens[:, None], mimic_cache)
        torch.testing.assert_close(logits, mimicked, rtol=0, atol=INTEGER_LOGITS_ATOL)
        # the input quantisation's own effect on each row's logits, as the eager model shows it
        moved = (mimicked - expected).abs().amax(-1) + INTEGER_LOGITS_ATOL
        top2 = expected.topk(2, dim=-1).values
        clear = top2[:, 0] - top2[:, 1] > 2 * moved
        assert torch.equal(logits.argmax(-1)[clear], expected.argmax(-1)[clear])
        compared += int(clear.sum())
        tokens = expected.argmax(-1)
    assert compared >= steps  # most steps have a margin the quantisation cannot close
