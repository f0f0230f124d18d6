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


# ---- The paged cache: a pool of blocks, a block table and a length per row --------------------

def _paged(args, row_lengths, block_size, spare_blocks=3, per_layer=False, seed=0):
    """`args`' weights over a paged cache (keys (N, H_kv, D, S), values (N, H_kv, S, D)) whose
    rows hold `row_lengths` tokens in shuffled blocks; every slot not filled is NaN (never
    read). With per_layer, layer l's rows hold l more tokens than row_lengths say (lengths and
    positions (n_layers, B)). Returns the op's arguments and each row's table as a list."""
    ids, layers, globals_, kv, config = args
    g = torch.Generator().manual_seed(seed)
    n_layers, B = len(layers) // len(LAYER_FIELDS), len(row_lengths)
    H_kv, D = config["n_kv_heads"], config["head_dim"]
    lengths = torch.tensor([[n + (layer if per_layer else 0) for n in row_lengths]
                            for layer in range(n_layers)])
    need = [-(-(int(lengths[:, b].max()) + 1) // block_size) for b in range(B)]
    order = torch.randperm(sum(need) + spare_blocks, generator=g).tolist()
    tables, width = [], max(need)
    for b in range(B):
        mine, order = order[: need[b]], order[need[b]:]
        tables.append(mine + [mine[0]] * (width - len(mine)))  # as the engine pads a table
    n_blocks = sum(need) + spare_blocks
    dtype = kv[0].dtype
    pools = []
    for layer in range(n_layers):
        keys = torch.full((n_blocks, H_kv, D, block_size), float("nan"), dtype=dtype)
        values = torch.full((n_blocks, H_kv, block_size, D), float("nan"), dtype=dtype)
        for b in range(B):
            for t in range(int(lengths[layer, b])):
                block, offset = tables[b][t // block_size], t % block_size
                keys[block, :, :, offset] = torch.randn(H_kv, D, generator=g).to(dtype)
                values[block, :, offset] = torch.randn(H_kv, D, generator=g).to(dtype)
        pools += [keys, values]
    config = dict(config, lengths=lengths if per_layer else lengths[0],
                  positions=(lengths if per_layer else lengths[0]) + 3,
                  block_tables=torch.tensor(tables))
    return (ids[:1].repeat(B) if len(ids) < B else ids[:B], layers, globals_, pools,
            config), tables


def _int8_per_channel(args, seed=0):
    """`args` with every layer's linear held as int8 codes with a scale per output channel."""
    ids, layers, globals_, kv, config = args
    g = torch.Generator().manual_seed(seed)
    layers = list(layers)
    scales = [None] * (len(layers) + len(globals_))
    for i, weight in enumerate(layers):
        if LAYER_FIELDS[i % len(LAYER_FIELDS)] in ("q", "k", "v", "o", "gate", "up", "down") \
                and weight is not None:
            layers[i] = torch.randint(-127, 128, weight.shape, generator=g, dtype=torch.int8)
            scales[i] = (torch.rand(weight.shape[0], 1, generator=g) * 0.004).to(weight.dtype)
    return (ids, layers, globals_, kv, dict(config, scales=scales, zeros=[None] * len(scales)))


def _run_paged(args, backend, dtype=None):
    ids, layers, globals_, kv, config = args
    if dtype is not None:  # the reference in float64 on upcast copies (inv_freq stays float32)
        layers = [w if w is None or not w.is_floating_point() else w.to(dtype) for w in layers]
        globals_ = [None if w is None else w if name == "inv_freq" else w.to(dtype)
                    for name, w in zip(GLOBAL_FIELDS, globals_)]
        kv = [c.to(dtype) for c in kv]
        config = dict(config)
        for key in ("scales", "zeros"):
            if config.get(key) is not None:
                config[key] = [None if s is None else s.to(dtype) for s in config[key]]
    else:
        kv = [c.clone() for c in kv]
    return transformer_decode_step(ids, layers, globals_, kv, backend=backend, **config), kv


PAGED_CASES = {
    # block_size dividing no length; the first row empty before its token
    "gqa-ragged-blocks-of-4": dict(stack=dict(B=3), rows=(0, 5, 13), block_size=4),
    "mqa-gelu-biases-blocks-of-5": dict(
        stack=dict(B=2, H=3, H_kv=1, D=8, activation="gelu", biases=True, embed_norm=True),
        rows=(7, 23), block_size=5),
    # blocks smaller than the kernel's 512-token chunk: several joined per chunk, many chunks
    "long-rows-blocks-of-48": dict(stack=dict(B=2, n_layers=1), rows=(700, 3), block_size=48),
    # blocks larger than a chunk: each split in several
    "long-rows-blocks-of-1024": dict(stack=dict(B=2, n_layers=1), rows=(1300, 600),
                                     block_size=1024, spare=0),
    "per-layer-lengths": dict(stack=dict(B=2, n_layers=3), rows=(6, 2), block_size=4,
                              per_layer=True),
    "sixteen-rows": dict(stack=dict(B=16), rows=tuple(range(0, 32, 2)), block_size=8),
}


@pytest.fixture
def float_products():
    """The kernel's float products for quantised weights (the reference's arithmetic) while a
    test runs, where the build also has the integer ones (transformer_step.int8_dots)."""
    switch = getattr(transformer_step, "int8_dots", None)
    before = switch(False) if switch is not None else None
    yield
    if switch is not None:
        switch(before)


@pytest.mark.parametrize("case", list(PAGED_CASES))
@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
def test_paged_cache_matches_the_float64_reference(case, int8, float_products):
    """Rows at different lengths over shuffled blocks: the kernel's logits are the reference's,
    each row's new key and value land in its slot `length` and nothing else is written."""
    spec = PAGED_CASES[case]
    torch.manual_seed(6)
    args, tables = _paged(_stack(**spec["stack"]), spec["rows"], spec["block_size"],
                          spec.get("spare", 3), spec.get("per_layer", False))
    if int8:
        args = _int8_per_channel(args)
    expected, expected_kv = _run_paged(args, "reference", torch.float64)
    got, got_kv = _run_paged(args, "cpu")
    assert_close("logits", expected, got, 1e-5)
    lengths = args[4]["lengths"].expand(len(got_kv) // 2, len(tables))
    S = spec["block_size"]
    for layer in range(len(got_kv) // 2):
        before_k, before_v = args[3][2 * layer], args[3][2 * layer + 1]
        written = torch.zeros_like(before_k, dtype=torch.bool)
        for b, table in enumerate(tables):
            n = int(lengths[layer, b])
            block, offset = table[n // S], n % S
            written[block, :, :, offset] = True
            for name, e, g in (("key", expected_kv[2 * layer][block, :, :, offset],
                                got_kv[2 * layer][block, :, :, offset]),
                               ("value", expected_kv[2 * layer + 1][block, :, offset],
                                got_kv[2 * layer + 1][block, :, offset])):
                assert_close(f"layer {layer} row {b} {name}", e, g, 1e-6)
        # every other slot as it was (NaN included)
        assert torch.equal(got_kv[2 * layer][~written].isnan(), before_k[~written].isnan())
        assert torch.equal(got_kv[2 * layer + 1].transpose(2, 3)[~written].isnan(),
                           before_v.transpose(2, 3)[~written].isnan())


def test_paged_and_contiguous_caches_give_the_same_step():
    """The same tokens in a paged cache and in a contiguous one (one block a row): the same
    logits, the same new keys."""
    torch.manual_seed(7)
    args, tables = _paged(_stack(B=3), (9, 2, 30), block_size=4)
    ids, layers, globals_, pools, config = args
    capacity = 40
    contiguous = []
    for keys, values in zip(pools[::2], pools[1::2]):
        k_t = torch.full((3, *keys.shape[1:3], capacity), float("nan"))
        v = torch.full((3, values.shape[1], capacity, values.shape[3]), float("nan"))
        for b, table in enumerate(tables):
            joined_k = keys[table].permute(1, 2, 0, 3).flatten(2)
            joined_v = values[table].transpose(0, 1).flatten(1, 2)
            k_t[b, ..., : joined_k.shape[-1]] = joined_k
            v[b, :, : joined_v.shape[1]] = joined_v
        contiguous += [k_t, v]
    paged_logits, paged_kv = _run_paged(args, "cpu")
    flat_config = {key: value for key, value in config.items() if key != "block_tables"}
    flat_logits, flat_kv = _run_paged((ids, layers, globals_, contiguous, flat_config), "cpu")
    assert_close("logits", paged_logits, flat_logits, 1e-6)
    for b, table in enumerate(tables):
        n = int(config["lengths"][b])
        assert_close(f"row {b} key", paged_kv[0][table[n // 4], :, :, n % 4],
                     flat_kv[0][b, :, :, n], 1e-7)


def test_paged_arguments_are_checked():
    torch.manual_seed(8)
    args, _ = _paged(_stack(B=2), (5, 9), block_size=4)
    ids, layers, globals_, pools, config = args
    full = dict(config, lengths=torch.tensor([5, 12]))  # 3 blocks of 4: slot 12 does not exist
    with pytest.raises(RuntimeError, match=r"holds 12 of 12 slots: no room .*row 1"):
        transformer_decode_step(ids, layers, globals_, pools, backend="cpu", **full)
    bad_table = config["block_tables"].clone()
    bad_table[0, 1] = 99
    with pytest.raises(RuntimeError, match=r"block_tables\[0, 1\] = 99 is outside layer 0's"):
        transformer_decode_step(ids, layers, globals_, pools, backend="cpu",
                                **dict(config, block_tables=bad_table))
    with pytest.raises(RuntimeError, match=r"lengths must be an int64 tensor \(n_layers, B\)"):
        transformer_decode_step(ids, layers, globals_, pools, backend="cpu",
                                **dict(config, lengths=torch.tensor([5, 9, 1])))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_logits_do_not_depend_on_the_batch_around_it(dtype):
    """Six rows in one call (inputs four, then two, at a time through each weight row) give
    each row the very logits it gets alone: the Engine's tokens are then generate's alone."""
    torch.manual_seed(9)
    ids, layers, globals_, kv, config = _stack(B=6, d=72, hidden=90, dtype=dtype)
    batched = transformer_decode_step(ids, layers, globals_, [c.clone() for c in kv],
                                      backend="cpu", **config)
    for b in range(6):
        alone = transformer_decode_step(ids[b: b + 1], layers, globals_,
                                        [c[b: b + 1].clone() for c in kv], backend="cpu",
                                        **config)
        assert torch.equal(batched[b: b + 1], alone), f"row {b}"
