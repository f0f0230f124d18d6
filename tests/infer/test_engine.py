"""zoo.infer.Engine: continuous batching gives every request the tokens zoo.infer.generate gives
it alone (greedy and seeded sampling), under joins, leaves, waits and chunked prefill; bounded
states in slots, attention's KV cache in blocks that are freed and reused; named errors."""

import pytest
import torch

import zoo
from zoo.infer import generate
from zoo.infer.engine import Engine, Request, TokenEvent
from zoo.infer.paged import KVBlockPool
from zoo.layers.attention import Attention

# every shipped family: attention (paged KV), the bounded mixers (slots), the hybrids (both), MoE
# FFNs, RWKV (channel-mix FFN states in slots, RWKV-7's forward context), and the layers whose
# state holds one length for its batch (Hyena, MLA, RetNet, linear attention: kept per request)
FAMILIES = [name for name in zoo.shipped_configs() if name.endswith("-tiny")]
SAMPLED = dict(temperature=0.9, top_k=30, top_p=0.9, repetition_penalty=1.2)


def _prompts(lengths, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _alone(model, request: Request) -> list[int]:
    """What zoo.infer.generate gives the request's prompt alone, with the same settings."""
    return generate(
        model, [list(request.prompt)], max_new_tokens=request.max_new_tokens,
        temperature=request.temperature, top_k=request.top_k or None,
        top_p=None if request.top_p == 1.0 else request.top_p,
        repetition_penalty=request.repetition_penalty, seed=request.seed,
        stop_tokens=list(request.stop_token_ids),
    ).tokens[0]


def _drive(engine: Engine, joins: dict[int, list[Request]],
           ) -> tuple[dict[int, list[int]], dict[int, str], dict[int, Request], list[dict]]:
    """Step the engine until it is idle, adding joins[s] before step s; tokens and finish
    reason per request id, the requests by id, and the stats after every step."""
    tokens, reasons, requests, history = {}, {}, {}, []
    step = 0
    while engine.has_work() or any(s >= step for s in joins):
        for request in joins.get(step, []):
            rid = engine.add(request)
            tokens[rid], requests[rid] = [], request
        for event in engine.step():
            assert event.request_id not in reasons, "an event after the request finished"
            if event.token is not None:
                tokens[event.request_id].append(event.token)
            if event.finish_reason is not None:
                reasons[event.request_id] = event.finish_reason
        history.append(engine.stats())
        step += 1
        assert step < 500, "the engine did not finish"
    return tokens, reasons, requests, history


@pytest.mark.parametrize("name", FAMILIES)
def test_tokens_equal_generate_alone_under_joins_and_leaves(name, make_model):
    """Eight requests of different lengths, budgets and settings join at steps 0, 2, 3 and 9 a
    batch of three slots, so some wait, and leave at different steps; each gets what it gets
    alone, greedy and seeded sampling alike."""
    model = make_model(name)
    prompts = _prompts([5, 1, 23, 8, 3, 12, 6, 4], seed=1)
    requests = [
        Request(prompt=prompts[0], max_new_tokens=9),
        Request(prompt=prompts[1], max_new_tokens=4, seed=3, **SAMPLED),
        Request(prompt=prompts[2], max_new_tokens=11),
        Request(prompt=prompts[3], max_new_tokens=6, seed=4, temperature=0.7),
        Request(prompt=prompts[4], max_new_tokens=13, repetition_penalty=1.5),
        Request(prompt=prompts[5], max_new_tokens=2, seed=5, **SAMPLED),
        Request(prompt=prompts[6], max_new_tokens=7),
        Request(prompt=prompts[7], max_new_tokens=1),  # done at its prefill's token
    ]
    engine = Engine(model, max_batch=3, block_size=4, prefill_chunk=10)
    joins = {0: requests[:2], 2: requests[2:4], 3: requests[4:6], 9: requests[6:]}
    tokens, reasons, by_id, history = _drive(engine, joins)
    for rid, request in by_id.items():
        assert tokens[rid] == _alone(model, request), f"request {rid}"
        assert reasons[rid] == "length"
    assert max(h["waiting"] for h in history) > 0  # the pool was full, so some requests waited
    assert history[-1]["free_slots"] == 3 and history[-1]["kv_blocks_used"] == 0


def test_stop_tokens_end_a_request_and_others_go_on(make_model):
    model = make_model("gated-deltanet-hybrid-tiny")
    prompts = _prompts([6, 4], seed=3)
    free = _alone(model, Request(prompt=prompts[0], max_new_tokens=12))
    stop = free[4]
    requests = [Request(prompt=prompts[0], max_new_tokens=12, stop_token_ids=(stop,)),
                Request(prompt=prompts[1], max_new_tokens=12)]
    tokens, reasons, by_id, _ = _drive(Engine(model, max_batch=4), {0: requests})
    first, second = sorted(by_id)
    assert tokens[first] == free[: free.index(stop) + 1] and reasons[first] == "stop"
    assert tokens[second] == _alone(model, requests[1]) and reasons[second] == "length"


@pytest.mark.parametrize("name", ["attention-tiny", "rwkv7-tiny"])
def test_chunked_prefill_equals_unchunked(name, make_model):
    model = make_model(name)
    requests = [Request(prompt=p, max_new_tokens=6) for p in _prompts([37, 5, 20], seed=4)]
    results = []
    for chunk in (1, 3, 1000):
        tokens, _, _, _ = _drive(Engine(model, max_batch=4, block_size=8, prefill_chunk=chunk),
                                 {0: requests})
        results.append(list(tokens.values()))
    assert results[0] == results[1] == results[2]
    assert results[2] == [_alone(model, r) for r in requests]


def test_prefill_is_interleaved_with_decoding(make_model):
    """A long prompt joining a running request is prefilled `prefill_chunk` tokens a step while
    the running request keeps getting a token every step."""
    model = make_model("attention-tiny")
    short, long = _prompts([3, 40], seed=5)
    engine = Engine(model, max_batch=2, prefill_chunk=8)
    running = engine.add(Request(prompt=short, max_new_tokens=12))
    engine.step()  # prefilled, first token
    joining = engine.add(Request(prompt=long, max_new_tokens=3))
    steps = []
    while engine.has_work():
        steps.append({e.request_id for e in engine.step()})
    # 40 prompt tokens at 8 a step: the joining request's first token comes on the 5th step,
    # and the running one had a token on each of them
    assert [joining in s for s in steps[:5]] == [False] * 4 + [True]
    assert all(running in s for s in steps[:5])


def test_kv_blocks_freed_on_finish_and_on_cancel_and_reused(make_model):
    model = make_model("attention-tiny")
    a, b, c = _prompts([10, 7, 9], seed=6)
    # 10 prompt + 6 new - 1 fed = 15 tokens: 4 blocks of 4; a pool of 4 blocks holds one request
    engine = Engine(model, max_batch=4, block_size=4, kv_blocks=4)
    first = engine.add(Request(prompt=a, max_new_tokens=6))
    second = engine.add(Request(prompt=b, max_new_tokens=8))  # 14 tokens: 4 blocks
    engine.step()
    stats = engine.stats()
    assert (stats["kv_blocks_used"], stats["kv_blocks_free"]) == (4, 0)
    assert (stats["active"], stats["waiting"]) == (1, 1)  # a slot is free, the blocks are not
    assert stats["kv_bytes_in_use"] == 10 * stats["kv_bytes_per_token"]
    while first not in {e.request_id for e in engine.step() if e.finish_reason}:
        pass
    stats = engine.stats()  # the finished request's blocks are back at once
    assert (stats["active"], stats["waiting"], stats["kv_blocks_used"]) == (0, 1, 0)
    engine.step()
    stats = engine.stats()  # and the waiting request took them
    assert (stats["active"], stats["waiting"], stats["kv_blocks_used"]) == (1, 0, 4)
    engine.cancel(second)
    stats = engine.stats()  # freed at once, before any step
    assert (stats["active"], stats["kv_blocks_free"], stats["free_slots"]) == (0, 4, 4)
    assert engine.step() == [TokenEvent(second, None, "cancelled")]
    assert not engine.has_work()
    tokens, _, by_id, _ = _drive(engine, {0: [Request(prompt=c, max_new_tokens=7)]})
    assert list(tokens.values()) == [_alone(model, Request(prompt=c, max_new_tokens=7))]
    assert engine.stats()["kv_blocks_free"] == 4


def test_a_waiting_request_runs_later_with_the_tokens_it_has_alone(make_model):
    model = make_model("mamba-tiny")
    requests = [Request(prompt=p, max_new_tokens=5 + i, seed=i, **SAMPLED)
                for i, p in enumerate(_prompts([4, 9, 2], seed=7))]
    engine = Engine(model, max_batch=1)
    tokens, reasons, by_id, history = _drive(engine, {0: requests})
    assert [h["waiting"] for h in history[:1]] == [2]
    assert [tokens[rid] for rid in sorted(by_id)] == [_alone(model, r) for r in requests]
    # one slot: the requests ran one after another, in the order they came
    assert max(h["active"] for h in history) == 1 and list(reasons) == sorted(by_id)
    assert history[-1]["free_slots"] == 1


def test_cancel_a_waiting_or_running_request_and_unknown_ids(make_model):
    model = make_model("gated-deltanet-hybrid-tiny")
    a, b, c = _prompts([5, 6, 7], seed=8)
    engine = Engine(model, max_batch=1)
    running = engine.add(Request(prompt=a, max_new_tokens=20))
    waiting = engine.add(Request(prompt=b, max_new_tokens=20))
    engine.step()
    engine.cancel(waiting)
    engine.cancel(12345)  # unknown: nothing happens
    events = engine.step()
    assert events[0] == TokenEvent(waiting, None, "cancelled")
    assert [e.request_id for e in events[1:]] == [running]
    engine.cancel(running)
    engine.cancel(running)  # twice: the second is a no-op
    assert engine.step() == [TokenEvent(running, None, "cancelled")]
    assert engine.stats()["free_slots"] == 1 and not engine.has_work()
    # the freed slot's state is overwritten by the next request's prefill, not carried over
    tokens, _, _, _ = _drive(engine, {0: [Request(prompt=c, max_new_tokens=6)]})
    assert list(tokens.values()) == [_alone(model, Request(prompt=c, max_new_tokens=6))]


def test_state_bytes_per_sequence_constant_for_a_bounded_model(make_model):
    model = make_model("mamba-tiny")
    engine = Engine(model, max_batch=2)
    alone = generate(model, [[1, 2, 3]], max_new_tokens=2).stats.state_bytes
    assert engine.stats()["state_bytes_per_sequence"] == alone
    assert engine.stats()["kv_blocks_total"] == 0 and engine.stats()["kv_bytes_per_token"] == 0


@pytest.mark.parametrize("name, grows", [
    ("mamba-tiny", None), ("attention-tiny", "kv_bytes_in_use"),
    ("hyena-tiny", "own_state_bytes_in_use"),
])
def test_memory_per_sequence_grows_only_where_the_state_does(name, grows, make_model):
    engine = Engine(make_model(name), max_batch=2)
    engine.add(Request(prompt=[1, 2, 3], max_new_tokens=20))
    seen = []
    while engine.has_work():
        engine.step()
        stats = engine.stats()
        if stats["active"]:
            seen.append((stats["kv_bytes_in_use"], stats["own_state_bytes_in_use"]))
    for index, field in enumerate(("kv_bytes_in_use", "own_state_bytes_in_use")):
        values = [entry[index] for entry in seen]
        if field == grows:
            assert values == sorted(values) and values[-1] > values[0] > 0, field
        else:
            assert set(values) == {0}, field


@pytest.mark.parametrize("mixer", [
    {"type": "attention", "n_heads": 4, "n_kv_heads": 1, "window": 5},
    {"type": "attention", "n_heads": 4, "n_kv_heads": 2, "qk_norm": True, "output_gate": True,
     "partial_rotary_factor": 0.5},
    {"type": "linear_attention", "n_heads": 4, "n_kv_heads": 2, "rope_theta": 10000.0},
    {"type": "linear_attention", "n_heads": 4, "rope_theta": 10000.0,
     "feature_maps_after_rotary": False},
    {"type": "window_linear_attention", "n_heads": 4, "n_kv_heads": 2, "window": 4},
], ids=["sliding-window", "gated", "linear-rotary", "linear-rotated-features", "lolcats"])
def test_mixer_variants_with_positions_decode_batched(mixer):
    """Rows at different positions in one decode step: attention from the blocks (a sliding
    window masked per row; Qwen3-Next's gated attention), and the bounded mixers that rotate
    at each row's own position from the slots (linear attention's two rotary forms, LoLCATs'
    window + linear attention, whose window also fills per row)."""
    config = zoo.load_config("attention-tiny")
    config.mixer = mixer
    torch.manual_seed(0)
    model = zoo.ZooForCausalLM(config).eval()
    with torch.no_grad():  # sharper scores, and mixer outputs outweighing the residual, so
        for block in model.model.layers:  # that a wrong position changes tokens
            for name, scale in (("q_proj", 4.0), ("k_proj", 4.0), ("o_proj", 8.0)):
                getattr(block.mixer, name).weight.mul_(scale)
    requests = [Request(prompt=p, max_new_tokens=9) for p in _prompts([11, 3, 6], seed=9)]
    tokens, _, by_id, _ = _drive(Engine(model, max_batch=2, block_size=4, prefill_chunk=5),
                                 {0: requests[:2], 4: requests[2:]})
    assert [tokens[rid] for rid in sorted(by_id)] == [_alone(model, r) for r in requests]


@pytest.mark.parametrize("kwargs, field", [
    ({"prompt": []}, "prompt"),
    ({"prompt": ["a"]}, "prompt"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"seed": 1.5}, "seed"),
    ({"stop_token_ids": [None]}, "stop_token_ids"),
])
def test_bad_requests_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Request(**{"prompt": [1, 2], **kwargs})


@pytest.mark.parametrize("name, kwargs, field", [
    ("attention-tiny", {"prompt": [1, 256]}, "prompt"),
    ("attention-tiny", {"prompt": [1], "stop_token_ids": (-1,)}, "stop_token_ids"),
    ("attention-tiny", {"prompt": [1] * 60, "max_new_tokens": 10}, "kv_blocks"),
    ("hyena-tiny", {"prompt": [1] * 10, "max_new_tokens": 10_000}, "max_new_tokens"),
])
def test_bad_requests_for_the_model_name_the_field(name, kwargs, field, make_model):
    engine = Engine(make_model(name), block_size=4, kv_blocks=16)
    with pytest.raises(ValueError, match=field):
        engine.add(Request(**kwargs))
    assert not engine.has_work()


@pytest.mark.parametrize("kwargs, field", [
    ({"max_batch": 0}, "max_batch"), ({"block_size": 0}, "block_size"),
    ({"prefill_chunk": 0}, "prefill_chunk"), ({"kv_blocks": 0}, "kv_blocks"),
])
def test_bad_engine_settings_name_the_field(kwargs, field, make_model):
    with pytest.raises(ValueError, match=field):
        Engine(make_model("attention-tiny"), **kwargs)


def test_unwritten_block_memory_never_reaches_a_token(make_model):
    """The block pool is allocated uninitialised; whatever it held (here NaN, what attention's
    mask cannot cancel) is zeroed when a block is first handed out."""
    model = make_model("attention-tiny")
    engine = Engine(model, max_batch=2, block_size=8)
    with torch.inference_mode():  # the engine made its pools there
        for tensor in (*engine.kv.keys.values(), *engine.kv.values.values()):
            tensor.fill_(float("nan"))
    requests = [Request(prompt=p, max_new_tokens=5) for p in _prompts([3, 10], seed=10)]
    tokens, _, by_id, _ = _drive(engine, {0: requests})
    assert [tokens[rid] for rid in sorted(by_id)] == [_alone(model, r) for r in requests]


@pytest.mark.parametrize("options", [
    {"n_heads": 4, "n_kv_heads": 2},
    {"n_heads": 4, "n_kv_heads": 1, "window": 3},
    {"n_heads": 4, "n_kv_heads": 2, "qk_norm": True, "output_gate": True,
     "partial_rotary_factor": 0.5},
])
@torch.no_grad()
def test_forward_paged_equals_each_rows_own_decode(options):
    """Attention.forward_paged over rows of 5, 9 and 2 cached tokens in scattered blocks: each
    row's output, and the keys and values it writes, are those of the row's own decode step."""
    torch.manual_seed(0)
    mixer = Attention(32, **options).eval()
    pool = KVBlockPool({0: (mixer.n_kv_heads, mixer.head_dim)}, 12, 4, torch.float32,
                       torch.device("cpu"))
    lengths, tables, expected = [5, 9, 2], [], []
    new = torch.randn(3, 1, 32)
    pool.allocate(1)  # block 0 held by no row: the rows' blocks are not in order
    for row, length in enumerate(lengths):
        blocks = pool.allocate(3)[::-1]
        history = torch.randn(1, length, 32)
        _, state = mixer(history)
        k, v = state.keys_values()
        pool.write(0, pool.slots(torch.tensor(blocks), 0, length), k[0].transpose(0, 1),
                   v[0].transpose(0, 1))
        y, state = mixer(new[row: row + 1], state)
        expected.append((y, *state.keys_values()))
        tables.append(blocks)
    positions = torch.tensor(lengths)
    y = mixer.forward_paged(new, positions, pool.keys[0], pool.values[0], torch.tensor(tables))
    for row, (y_alone, k_alone, v_alone) in enumerate(expected):
        torch.testing.assert_close(y[row: row + 1], y_alone, msg=f"row {row} output")
        written = pool.slots(torch.tensor(tables[row]), lengths[row], 1)
        k, v = pool.read(0, written)
        torch.testing.assert_close(k, k_alone[0, :, -1:].transpose(0, 1), msg=f"row {row} key")
        torch.testing.assert_close(v, v_alone[0, :, -1:].transpose(0, 1), msg=f"row {row} value")
