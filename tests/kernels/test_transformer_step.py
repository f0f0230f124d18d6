import pytest
import torch

from zoo.kernels import transformer_step
from zoo.kernels.transformer_step import (
    GLOBAL_FIELDS,
    LAYER_FIELDS,
    transformer_decode_step,
)
from zoo.testing import assert_close


def _stack(n_layers=2, d=40, H=4, H_kv=2, D=16, hidden=50, V=37, B=2, lengths=(5, 9),
           capacity=None, activation="swiglu", rotary=True, biases=False, embed_norm=False,
           no_ffn_layers=(), dtype=torch.float32):
    """Random weights, caches with `lengths` filled slots, and the op's arguments. Sizes off
    every vector width, row group of four and (with long lengths) 512-token block."""
    def t(*shape, scale=0.3):
        return (torch.randn(*shape) * scale).to(dtype)

    layers = []
    for layer in range(n_layers):
        f = dict.fromkeys(LAYER_FIELDS)
        f.update(mixer_norm=1 + t(d, scale=0.1), q=t(H * D, d), k=t(H_kv * D, d),
                 v=t(H_kv * D, d), o=t(d, H * D))
        if biases:
            f.update(q_bias=t(H * D), k_bias=t(H_kv * D), v_bias=t(H_kv * D), o_bias=t(d))
        if layer not in no_ffn_layers:
            f.update(ffn_norm=1 + t(d, scale=0.1), gate=t(hidden, d), down=t(d, hidden))
            if activation == "swiglu":
                f["up"] = t(hidden, d)
            if biases:
                f.update(gate_bias=t(hidden), down_bias=t(d),
                         up_bias=t(hidden) if activation == "swiglu" else None)
        layers += [f[field] for field in LAYER_FIELDS]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D)) if rotary else None
    globals_ = dict(embed=t(V + 3, d, scale=1.0), embed_norm=1 + t(d, scale=0.1) if embed_norm
                    else None, final_norm=1 + t(d, scale=0.1), head=t(V, d), inv_freq=inv_freq)
    kv = []
    for length in lengths:
        cap = capacity or max(lengths) + 4
        k_t, v = t(B, H_kv, D, cap, scale=1.0), t(B, H_kv, cap, D, scale=1.0)
        k_t[..., length:] = float("nan")  # free slots: never read
        v[:, :, length:] = float("nan")
        kv += [k_t, v]
    ids = torch.randint(0, V + 3, (B,))
    return ids, layers, [globals_[f] for f in GLOBAL_FIELDS], kv, dict(
        lengths=list(lengths), positions=[n + 3 for n in lengths], n_heads=H, n_kv_heads=H_kv,
        head_dim=D, eps=1e-5, activation=activation)



def _run(args, backend, dtype=None, greedy=False):
    ids, layers, globals_, kv, config = args
    if dtype is not None:  # the reference in float64 on upcast copies (inv_freq stays float32)
        layers = [None if w is None else w.to(dtype) for w in layers]
        globals_ = [None if w is None else w if name == "inv_freq" else w.to(dtype)
                    for name, w in zip(GLOBAL_FIELDS, globals_)]
        kv = [c.to(dtype) for c in kv]
    else:
        kv = [c.clone() for c in kv]
    out = transformer_decode_step(ids, layers, globals_, kv, greedy=greedy, backend=backend,
                                  **config)
    return out, kv


CASES = {
    "gqa-swiglu-rotary": {},
    "mqa-gelu-biases-embed-norm": dict(H=3, H_kv=1, D=8, activation="gelu", biases=True,
                                       embed_norm=True),
    "mha-no-rotary-one-layer-without-ffn": dict(H=2, H_kv=2, rotary=False, no_ffn_layers=(1,)),
    "long-cache-two-blocks": dict(lengths=(700, 511), B=1),
    "batch-of-three": dict(B=3, n_layers=3, lengths=(0, 4, 16)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cpu_kernel_matches_the_float64_reference(case):
    torch.manual_seed(0)
    args = _stack(**CASES[case])
    expected, expected_kv = _run(args, "reference", torch.float64)
    got, got_kv = _run(args, "cpu")
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert_close("logits", expected, got, 1e-5)
    for layer, length in enumerate(args[4]["lengths"]):
        # the new token's key (rotated) and value in slot `length`, nothing else written
        for name, e, g in (("k_t", expected_kv[2 * layer][..., : length + 1],
                            got_kv[2 * layer][..., : length + 1]),
                           ("v", expected_kv[2 * layer + 1][:, :, : length + 1],
                            got_kv[2 * layer + 1][:, :, : length + 1])):
            assert_close(f"layer {layer} {name}", e, g, 1e-6)
        assert got_kv[2 * layer][..., length + 1 :].isnan().all()


def test_greedy_returns_the_argmax_of_the_logits():
    torch.manual_seed(1)
    args = _stack(B=3, V=203)
    logits, _ = _run(args, "cpu")
    tokens, _ = _run(args, "cpu", greedy=True)
    assert tokens.dtype == torch.int64 and torch.equal(tokens, logits.argmax(-1))


def test_greedy_ties_go_to_the_lowest_id():
    torch.manual_seed(2)
    ids, layers, globals_, kv, config = _stack(B=1, V=64)
    head = globals_[GLOBAL_FIELDS.index("head")]
    head[:] = 0  # every logit 0.0: torch's argmax says 0
    tokens = transformer_decode_step(ids, layers, globals_, kv, greedy=True, backend="cpu",
                                     **config)
    assert tokens.tolist() == [0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights(dtype):
    torch.manual_seed(3)
    args = _stack(dtype=dtype)
    expected, _ = _run(args, "reference", torch.float64)
    got, kv = _run(args, "cpu")
    assert got.dtype == dtype and kv[0].dtype == dtype
    assert_close("logits", expected, got, 2e-2)


def test_the_kernel_does_not_depend_on_the_thread_count():
    torch.manual_seed(4)
    args = _stack(lengths=(900, 900), B=1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = _run(args, "cpu")
    finally:
        torch.set_num_threads(threads)
    many, _ = _run(args, "cpu")
    assert_close("logits", one, many, 1e-6)


def test_a_full_cache_is_an_error_not_a_write_past_the_end():
    args = _stack(lengths=(5, 9), capacity=9)
    with pytest.raises(RuntimeError, match=r"layer 1's cache holds 9 of 9 slots: no room"):
        _run(args, "cpu")


def test_a_wrong_weight_names_itself_and_its_layer():
    ids, layers, globals_, kv, config = _stack()
    layers[len(LAYER_FIELDS) + LAYER_FIELDS.index("k")] = torch.randn(3, 40)
    with pytest.raises(RuntimeError, match=r"k_proj of layer 1 must be a contiguous CPU tensor"):
        transformer_decode_step(ids, layers, globals_, kv, backend="cpu", **config)


def test_bad_arguments_are_named():
    ids, layers, globals_, kv, config = _stack()
    with pytest.raises(ValueError, match="backend='triton' is not one of"):
        transformer_decode_step(ids, layers, globals_, kv, backend="triton", **config)
    with pytest.raises(ValueError, match=r"activation='relu' is not one of \('swiglu', 'gelu'\)"):
        transformer_decode_step(ids, layers, globals_, kv, **{**config, "activation": "relu"})
    with pytest.raises(ValueError, match="16 layer weights per layer"):
        transformer_decode_step(ids, layers[:-1], globals_, kv, **config)
    with pytest.raises(RuntimeError, match="token id 40 is outside the embedding's 40 rows"):
        transformer_decode_step(torch.tensor([40, 0]), layers, globals_, kv, backend="cpu",
                                **config)


def test_auto_takes_the_kernel_on_the_cpu():
    assert transformer_step.load(), "the C++ kernel must build here (see the warning)"
    torch.manual_seed(5)
    args = _stack()
    assert torch.equal(_run(args, "auto")[0], _run(args, "cpu")[0])
