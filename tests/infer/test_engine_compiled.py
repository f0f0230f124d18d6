"""zoo.infer.Engine's fast decode paths: Mamba-2's step updating its pooled state in place, and
the compiled batched step (Engine(compile=True)), each giving the eager engine's and generate's
tokens under joins and leaves."""

import pytest
import torch

import zoo
from zoo.infer import generate
from zoo.infer.engine import Engine, Request
from zoo.layers.mamba2 import Mamba2


def _prompts(lengths, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _alone(model, request: Request) -> list[int]:
    return generate(model, [list(request.prompt)], max_new_tokens=request.max_new_tokens,
                    temperature=request.temperature, seed=request.seed).tokens[0]


def _drive(engine: Engine, joins: dict[int, list[Request]]) -> dict[int, list[int]]:
    """Step the engine until idle, adding joins[s] before step s; tokens per request id."""
    tokens, step = {}, 0
    while engine.has_work() or any(s >= step for s in joins):
        for request in joins.get(step, []):
            tokens[engine.add(request)] = []
        for event in engine.step():
            if event.token is not None:
                tokens[event.request_id].append(event.token)
        step += 1
        assert step < 300, "the engine did not finish"
    return tokens


def _mamba2_model(options: dict, dtype: torch.dtype = torch.float32) -> zoo.ZooForCausalLM:
    config = zoo.load_config("mamba2-tiny")
    config.mixer = {"type": "mamba2", **options}
    torch.manual_seed(0)
    return zoo.ZooForCausalLM(config).to(dtype).eval()


MAMBA2_VARIANTS = [{"d_state": 16, "head_dim": 32}, *Mamba2.test_variants]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("options", MAMBA2_VARIANTS)
@torch.inference_mode()
def test_mamba2_step_in_place_equals_the_mixers_own_step(options, dtype):
    """The engine's in-place step gives Mamba2.forward's output and new state (T = 1), groups of
    heads sharing B and C, dt_limit and biases included, and writes the state where it lies."""
    torch.manual_seed(1)
    mixer = Mamba2(64, **options).to(dtype)
    x = 4 * torch.randn(3, 5, 64, dtype=dtype)  # dt spread past dt_limit
    _, state = mixer(x[:, :4])  # a state with history in both the convolution and the SSM
    expected, expected_state = mixer(x[:, 4:], state)
    ssm_storage = state.ssm_state.data_ptr()
    y = mixer.step_in_place(x[:, 4:], state)
    tolerance = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(y, expected, **tolerance)
    torch.testing.assert_close(state.ssm_state, expected_state.ssm_state, **tolerance)
    torch.testing.assert_close(state.conv_state, expected_state.conv_state, **tolerance)
    assert state.ssm_state.data_ptr() == ssm_storage


@pytest.mark.parametrize("options", MAMBA2_VARIANTS[1:2])
def test_mamba2_engine_with_rows_out_of_slot_order_equals_generate(options):
    """Requests leaving and joining leave the decoding rows' slots out of order (taken in slot
    order, as one range of the pool) or with holes (gathered): every request still gets the
    tokens it gets alone."""
    model = _mamba2_model(options)
    prompts = _prompts([4, 9, 2, 6, 3, 5, 7], seed=2)
    budgets = [3, 12, 9, 5, 10, 4, 6]
    requests = [Request(prompt=p, max_new_tokens=n) for p, n in zip(prompts, budgets)]
    engine = Engine(model, max_batch=4, prefill_chunk=4)
    tokens = _drive(engine, {0: requests[:3], 2: requests[3:5], 5: requests[5:]})
    assert [tokens[rid] for rid in sorted(tokens)] == [_alone(model, r) for r in requests]


def _dynamo_without_inductor(monkeypatch) -> None:
    """torch.compile as the engine calls it, with the eager backend: dynamo's tracing, guards
    and graph counts unchanged, no code generation (tests/infer/test_generate.py's trick)."""
    real_compile = torch.compile

    def dynamo_only(fn, *, dynamic=None, options=None):
        kept = {"guard_filter_fn": options["guard_filter_fn"]} if options else None
        return real_compile(fn, backend="eager", dynamic=dynamic, options=kept)

    monkeypatch.setattr(torch, "compile", dynamo_only)


# a bounded mixer (Mamba-2), a hybrid (gated DeltaNet + paged attention, run eager between the
# compiled segments), RWKV-6 (its channel-mix FFN state in slots too), Hyena (a per-request state)
COMPILED_FAMILIES = {"mamba2-tiny": 1, "gated-deltanet-hybrid-tiny": 2, "rwkv6-tiny": 1,
                     "hyena-tiny": 3}  # -> compiled segments in the step


@pytest.mark.parametrize("name", COMPILED_FAMILIES)
def test_compiled_engine_equals_eager_and_generate_without_recompiling(name, make_model,
                                                                      monkeypatch):
    """Requests join and leave a batch of four slots (buckets 1, 2 and 4, so steps of three rows
    run one padding row on the spare slot): the compiled engine gives every request the eager
    engine's tokens and generate's, and after warm_up (one graph per bucket and segment) no step
    compiles again."""
    from torch._dynamo.utils import counters

    _dynamo_without_inductor(monkeypatch)
    model = make_model(name)
    prompts = _prompts([5, 2, 9, 4, 7, 3], seed=4)
    requests = [Request(prompt=p, max_new_tokens=n) for p, n in zip(prompts, [6, 11, 3, 8, 5, 9])]
    requests[1] = Request(prompt=prompts[1], max_new_tokens=11, temperature=0.8, seed=7)
    joins = {0: requests[:3], 2: requests[3:5], 4: requests[5:]}
    eager = _drive(Engine(model, max_batch=4, block_size=4, prefill_chunk=4), joins)

    torch._dynamo.reset()
    counters.clear()
    engine = Engine(model, max_batch=4, block_size=4, prefill_chunk=4, compile=True)
    assert engine.warm_up() > 0 and engine.compile_seconds > 0
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 3 * COMPILED_FAMILIES[name]
    compiled = _drive(engine, joins)
    assert counters["stats"]["unique_graphs"] == graphs, "a step recompiled after warm-up"
    assert compiled == eager
    assert [compiled[rid] for rid in sorted(compiled)] == [_alone(model, r) for r in requests]


def test_compile_setting_is_checked_and_warm_up_without_it_is_free(make_model):
    model = make_model("mamba2-tiny")
    with pytest.raises(ValueError, match="compile="):
        Engine(model, compile="inductor")
    assert Engine(model).warm_up() == 0.0
