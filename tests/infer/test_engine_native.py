"""zoo.infer.Engine decoding through zoo's native C++ step (zoo.infer.native's paged step):
every running row in one call over the engine's KV blocks, rows at different lengths. Its
tokens are those of the engine's eager step and of zoo.infer.generate alone, under joins and
leaves, greedy and seeded sampling, on float and int8-compressed models; blocks are freed and
reused; native=True names what it cannot run."""

import pytest
import torch

import zoo
from zoo.compression import quantize_model
from zoo.infer import generate, native
from zoo.infer.engine import Engine, Request
from zoo.kernels import transformer_step

SAMPLED = dict(temperature=0.9, top_k=30, top_p=0.9, repetition_penalty=1.2)


def _model(seed=0, int8=False, **changes):
    """attention-tiny (GQA: 4 query heads on 2 KV heads, SwiGLU, RMSNorm, rotary) with config
    changes; with int8, every linear but the head quantised to int8 per output channel."""
    config = zoo.load_config("attention-tiny")
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = zoo.ZooForCausalLM(config).eval()
    with torch.no_grad():  # weights of a trained model's scale, so tokens are not near ties
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.1)
    if int8:
        quantize_model(model, "int8", None)
    return model


MODELS = {
    "gqa": {},
    "mqa-gelu-biases-three-layers": dict(
        mixer={"type": "attention", "n_heads": 4, "n_kv_heads": 1, "qkv_bias": True},
        ffn={"type": "mlp"}, n_layers=3),
    "int8": dict(int8=True),
}


def _prompts(lengths, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _alone(model, request: Request, compile: bool | str = False) -> list[int]:
    """What zoo.infer.generate gives the request's prompt alone, with the same settings."""
    return generate(
        model, [list(request.prompt)], max_new_tokens=request.max_new_tokens, compile=compile,
        temperature=request.temperature, top_k=request.top_k or None,
        top_p=None if request.top_p == 1.0 else request.top_p,
        repetition_penalty=request.repetition_penalty, seed=request.seed,
        stop_tokens=list(request.stop_token_ids),
    ).tokens[0]


def _counting_native_calls(engine: Engine) -> list[int]:
    """Wrap the engine's native step; the list collects each call's row count."""
    calls, step = [], engine._native_step

    def counted(ids, kv, tables, positions):
        calls.append(ids.shape[0])
        return step(ids, kv, tables, positions)

    engine._native_step = counted
    return calls


def _drive(engine: Engine, joins: dict[int, list[Request]]):
    """Step until idle, adding joins[s] before step s: tokens and finish reason per request
    (in the order added), and the stats after every step."""
    tokens, reasons, order, history = {}, {}, [], []
    step = 0
    while engine.has_work() or any(s >= step for s in joins):
        for request in joins.get(step, []):
            rid = engine.add(request)
            tokens[rid] = []
            order.append(rid)
        for event in engine.step():
            if event.token is not None:
                tokens[event.request_id].append(event.token)
            if event.finish_reason is not None:
                reasons[event.request_id] = event.finish_reason
        history.append(engine.stats())
        step += 1
        assert step < 500, "the engine did not finish"
    return [tokens[r] for r in order], [reasons[r] for r in order], history


@pytest.mark.parametrize("name", list(MODELS))
def test_native_tokens_equal_eager_and_generate_alone_under_joins_and_leaves(name):
    """Seven requests join a batch of three slots at steps 0, 2, 3 and 8 (some wait), with
    prompts of 1 to 23 tokens (rows 1 to 40 tokens apart) in blocks of 4, and leave at
    different steps: the native engine's tokens are the eager engine's and generate's alone."""
    model = _model(**MODELS[name])
    prompts = _prompts([5, 1, 23, 8, 3, 12, 6], seed=1)
    stop = _alone(model, Request(prompt=prompts[6], max_new_tokens=8))[3]
    requests = [
        Request(prompt=prompts[0], max_new_tokens=9),
        Request(prompt=prompts[1], max_new_tokens=17, seed=3, **SAMPLED),
        Request(prompt=prompts[2], max_new_tokens=11),
        Request(prompt=prompts[3], max_new_tokens=6, seed=4, temperature=0.7),
        Request(prompt=prompts[4], max_new_tokens=13, repetition_penalty=1.5),
        Request(prompt=prompts[5], max_new_tokens=2, seed=5, **SAMPLED),
        Request(prompt=prompts[6], max_new_tokens=8, stop_token_ids=(stop,)),
    ]
    joins = {0: requests[:2], 2: requests[2:4], 3: requests[4:6], 8: requests[6:]}
    runs = {}
    for mode in (True, False):
        engine = Engine(model, max_batch=3, block_size=4, prefill_chunk=10, native=mode)
        calls = _counting_native_calls(engine) if mode else None
        runs[mode] = _drive(engine, joins)
        if mode:
            assert max(calls) == 3, "three rows never decoded in one native call"
    native_tokens, native_reasons, _ = runs[True]
    # generate's own native step (a contiguous cache, the request alone): the same kernel
    assert native_tokens == [_alone(model, r, compile="native") for r in requests]
    assert native_reasons[6] == "stop"
    if name != "int8":  # float weights: the eager step's tokens too (int8 products may round
        # their inputs to int8 in the kernel, kernels/transformer_step/int8_dots.h)
        assert native_tokens == runs[False][0]
        assert native_reasons == runs[False][1]
        assert native_tokens == [_alone(model, r) for r in requests]


def test_native_rows_beyond_the_kernels_batch_go_in_several_calls(monkeypatch):
    """20 rows at once (the kernel takes 16 a call): the kernel called on 16 rows then 4, the
    same tokens as the eager engine's."""
    model = _model(seed=2)
    requests = [Request(prompt=p, max_new_tokens=5) for p in _prompts(range(1, 21), seed=2)]
    kernel, kernel_rows = transformer_step.transformer_decode_step, []

    def counted(ids, *args, **kwargs):
        kernel_rows.append(ids.shape[0])
        return kernel(ids, *args, **kwargs)

    monkeypatch.setattr(transformer_step, "transformer_decode_step", counted)
    results = {}
    for mode in (True, False):
        engine = Engine(model, max_batch=20, block_size=8, prefill_chunk=256, native=mode)
        results[mode] = _drive(engine, {0: requests})[0]
    assert kernel_rows[:2] == [native.MAX_NATIVE_BATCH, 20 - native.MAX_NATIVE_BATCH]
    assert results[True] == results[False]


def test_native_blocks_are_freed_and_reused():
    """A pool with room for one request at a time: the second waits for the first's blocks,
    decodes in them (the first's keys still there, masked by its length) and gets its own
    tokens; every block is free at the end."""
    model = _model(seed=3)
    first, second = (Request(prompt=p, max_new_tokens=10) for p in _prompts([9, 6], seed=3))
    engine = Engine(model, max_batch=2, block_size=4, kv_blocks=5, native=True)
    held = []
    original = engine._native_step

    def watching(ids, kv, tables, positions):
        held.append(sorted({int(b) for b in tables.flatten()}))
        return original(ids, kv, tables, positions)

    engine._native_step = watching
    tokens, _, history = _drive(engine, {0: [first, second]})
    assert tokens == [_alone(model, first), _alone(model, second)]
    assert max(h["decoding"] for h in history) == 1  # never both: the second waited
    # the first held blocks 0-4; the second, alone after it, decodes in 0-3 of them
    assert held[0] == [0, 1, 2] and held[-1] == [0, 1, 2, 3]
    assert history[-1]["kv_blocks_free"] == history[-1]["kv_blocks_total"] == 5


def test_native_true_names_why_it_cannot_run():
    with pytest.raises(ValueError, match=r"native=True: .* layer 0's mixer is Mamba"):
        Engine(zoo.ZooForCausalLM(zoo.load_config("mamba-tiny")).eval(), native=True)
    with pytest.raises(ValueError, match=r"native=True: .*norm='layer'"):
        Engine(_model(norm="layer"), native=True)
    with pytest.raises(ValueError, match=r"native='yes' must be True, False or 'auto'"):
        Engine(_model(), native="yes")


def test_auto_takes_the_native_step_where_it_applies():
    assert Engine(_model()).stats is not None  # constructed
    assert Engine(_model())._native_step is not None
    assert Engine(_model(), native=False)._native_step is None
    assert Engine(zoo.ZooForCausalLM(zoo.load_config("mamba-tiny")).eval())._native_step is None
