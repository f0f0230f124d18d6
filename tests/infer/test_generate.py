"""zoo.infer.generate against transformers' generate and the full forward, on every tiny config:
ragged batches, stop tokens, seeded sampling and streaming."""

import pytest
import torch

import zoo
from zoo.infer import generate, stream
from zoo.infer.generate import decode_step, prefill, states_mergeable

TINY = [name for name in zoo.shipped_configs() if name.endswith("-tiny")]
# attention-tiny through the native C++ step and through torch.compile; Mamba's compile=True
COMPILED_MODES = [
    ("attention-tiny", "native"), ("attention-tiny", "inductor"), ("mamba-tiny", True)]


def _prompts(lengths, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("name", TINY)
def test_greedy_equals_transformers_generate(name, make_model):
    model = make_model(name)
    prompts = _prompts([7, 7])
    result = generate(model, prompts, max_new_tokens=10)
    with torch.no_grad():
        expected = model.generate(torch.tensor(prompts), max_new_tokens=10, do_sample=False)
    assert result.tokens == expected[:, 7:].tolist()
    assert result.finish_reasons == ["length", "length"]


@pytest.mark.parametrize("name", TINY)
def test_greedy_equals_full_forward_argmax_at_every_position(name, make_model):
    model = make_model(name)
    prompt = _prompts([6])[0]
    tokens = generate(model, prompt, max_new_tokens=14).tokens[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0]
    # position t predicts token t + 1: the prompt's last position predicts the first new token
    assert logits[len(prompt) - 1 : -1].argmax(-1).tolist() == tokens


@pytest.mark.parametrize("name", TINY)
def test_ragged_batch_equals_one_by_one(name, make_model):
    model = make_model(name)
    prompts = _prompts([5, 9, 2, 9, 1], seed=1)
    batch = generate(model, prompts, max_new_tokens=9)
    alone = [generate(model, [p], max_new_tokens=9).tokens[0] for p in prompts]
    assert batch.tokens == alone
    assert [len(t) for t in batch.tokens] == [9] * 5
    assert batch.stats.merged_prefill == states_mergeable(model)


@pytest.mark.parametrize("name", TINY)
@torch.no_grad()
def test_ragged_prefill_leaves_each_row_the_state_it_has_alone(name, make_model, caches_equal):
    """Merged rows (bounded states) or the common prefix plus the row's own tail (catch-up):
    either way a row's state is the state of its prompt alone, padding never enters it."""
    model = make_model(name)
    prompts = _prompts([4, 8, 1, 8], seed=2)
    start = prefill(model, prompts)
    for row, prompt in enumerate(prompts):
        own = start.cache.index_select(torch.tensor([row]))
        if start.tails[row]:
            decode_step(model, torch.tensor([start.tails[row]]), own)
        alone = model.new_cache()
        decode_step(model, torch.tensor([prompt]), alone)
        caches_equal(own, alone)


@pytest.mark.parametrize("name", TINY)
def test_rows_stop_at_their_stop_token_and_the_rest_go_on(name, make_model):
    model = make_model(name)
    prompts = _prompts([6, 3, 8], seed=3)
    free = generate(model, prompts, max_new_tokens=12)
    stop = free.tokens[0][4]  # row 0 generates it as its 5th token
    batch = generate(model, prompts, max_new_tokens=12, stop_tokens=[stop])
    alone = [generate(model, [p], max_new_tokens=12, stop_tokens=stop).tokens[0]
             for p in prompts]
    assert batch.tokens == alone
    first = free.tokens[0].index(stop)
    assert batch.tokens[0] == free.tokens[0][: first + 1]
    assert batch.finish_reasons[0] == "stop"
    for row, tokens in enumerate(batch.tokens):
        expected = free.tokens[row]
        if stop in expected:
            expected = expected[: expected.index(stop) + 1]
        assert tokens == expected
        assert batch.finish_reasons[row] == ("stop" if stop in tokens else "length")


@pytest.mark.parametrize("name", ["attention-tiny", "linear-attention-tiny"])
def test_eos_stops_as_in_transformers(name, make_model):
    model = make_model(name)
    prompt = _prompts([5], seed=4)[0]
    eos = generate(model, prompt, max_new_tokens=10).tokens[0][3]
    ours = generate(model, prompt, max_new_tokens=10, eos_token_id=eos).tokens[0]
    with torch.no_grad():
        theirs = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                eos_token_id=eos, pad_token_id=eos)[0, 5:].tolist()
    assert ours == theirs and ours[-1] == eos and len(ours) <= 4


def test_the_config_eos_is_the_default_stop(make_model):
    model = make_model("attention-tiny")
    prompt = _prompts([5], seed=4)[0]
    eos = generate(model, prompt, max_new_tokens=10).tokens[0][2]
    model.config.eos_token_id = eos
    assert generate(model, prompt, max_new_tokens=10).tokens[0][-1] == eos
    assert len(generate(model, prompt, max_new_tokens=10, stop_tokens=[]).tokens[0]) == 10


@pytest.mark.parametrize("name", ["attention-tiny", "rwkv6-tiny"])
def test_seeded_sampling_is_reproducible_and_leaves_the_global_rng(name, make_model):
    model = make_model(name)
    prompts = _prompts([4, 6], seed=5)
    kwargs = dict(max_new_tokens=16, temperature=1.0, top_k=40, top_p=0.95,
                  repetition_penalty=1.1)
    rng = torch.get_rng_state()
    a = generate(model, prompts, seed=7, **kwargs).tokens
    assert torch.equal(rng, torch.get_rng_state())
    assert a == generate(model, prompts, seed=7, **kwargs).tokens
    assert a != generate(model, prompts, seed=8, **kwargs).tokens
    # (one generator serves the batch: a row's draws depend on its batch, not on the run)
    assert a != generate(model, prompts, max_new_tokens=16).tokens


def test_repetition_penalty_discourages_repeats(make_model):
    model = make_model("attention-tiny")
    prompt = _prompts([4], seed=6)[0]
    plain = generate(model, prompt, max_new_tokens=40).tokens[0]
    penalised = generate(model, prompt, max_new_tokens=40, repetition_penalty=5.0).tokens[0]
    assert len(set(penalised)) > len(set(plain))
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                                  repetition_penalty=5.0)[0, 4:].tolist()
    assert penalised == expected


def test_stream_yields_the_tokens_of_generate_in_order(make_model):
    model = make_model("rwkv4-tiny")
    prompts = _prompts([3, 7], seed=7)
    expected = generate(model, prompts, max_new_tokens=6)
    run = stream(model, prompts, max_new_tokens=6)
    seen = {0: [], 1: []}
    for row, token in run:
        seen[row].append(token)
    assert [seen[0], seen[1]] == expected.tokens
    assert run.result.tokens == expected.tokens


def test_stats_and_cache(make_model):
    model = make_model("linear-attention-tiny")
    result = generate(model, _prompts([5, 5]), max_new_tokens=8, return_cache=True)
    stats = result.stats
    assert stats.batch_size == 2 and stats.prompt_tokens == 10 and stats.generated_tokens == 16
    assert stats.decode_steps == 7 and stats.prefill_tokens_per_s > 0
    assert stats.decode_tokens_per_s > 0
    assert stats.state_bytes == result.cache.nbytes() > 0
    layer = model.model.layers[0]
    assert stats.state_bytes == model.config.n_layers * layer.mixer.state_size(13)


def test_generate_restores_training_mode(make_model):
    model = make_model("moe-tiny").train()
    generate(model, [1, 2, 3], max_new_tokens=2)
    assert model.training


@pytest.mark.parametrize("prompts, match", [
    ([], "empty"), ([[1, 2], []], r"prompts\[1\] is empty"), ([[1, 256]], "token id 256"),
])
def test_bad_prompts_are_named(prompts, match, make_model):
    with pytest.raises(ValueError, match=match):
        generate(make_model("attention-tiny"), prompts, max_new_tokens=2)


# the configs whose inductor compile is the suite's slowest: their steps go through dynamo alone
# (backend "eager": the graphs, breaks and recompilations this test counts, without inductor's
# code generation), so inductor's output is checked here for the other configs only
DYNAMO_ONLY = {"rwkv6-tiny", "rwkv7-tiny", "hyena-tiny", "mixtral-tiny",
               "gated-deltanet-hybrid-tiny", "kimi-linear-tiny"}


def _dynamo_without_inductor(monkeypatch) -> None:
    """torch.compile as the decode step calls it, with the eager backend: dynamo's tracing and
    guards (what the one-graph checks count) unchanged, no code generation."""
    real_compile = torch.compile

    def dynamo_only(fn, *, dynamic=None, options=None):
        kept = {"guard_filter_fn": options["guard_filter_fn"]} if options else None
        return real_compile(fn, backend="eager", dynamic=dynamic, options=kept)

    monkeypatch.setattr(torch, "compile", dynamo_only)


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY)
def test_compiled_decode_step_is_one_graph_with_the_same_tokens(name, make_model, monkeypatch):
    """torch.compile of the step (inductor on CPU; CUDA graphs on a GPU, not run here) gives
    the eager tokens, with no graph break (a host read, a data-dependent shape) and at most one
    recompilation (prefill's states may differ in stride from the step's own) over a decode
    whose KV caches and histories grow."""
    from torch._dynamo.utils import counters

    if name in DYNAMO_ONLY:
        _dynamo_without_inductor(monkeypatch)
    model = make_model(name)
    prompts = _prompts([5, 5], seed=8)
    eager = generate(model, prompts, max_new_tokens=12)
    torch._dynamo.reset()
    counters.clear()
    # "inductor": attention-tiny would take the native C++ step (tests/infer/test_native.py)
    assert generate(model, prompts, max_new_tokens=12, compile="inductor").tokens == eager.tokens
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] <= 2
    # another prompt length reuses the compiled step rather than compiling per prompt: at
    # most one more graph for a KV cache whose capacity turns dynamic, one more for Hyena's
    # filter table growing to the next power of two
    other = _prompts([9, 9], seed=9)
    again = generate(model, other, max_new_tokens=12, compile="inductor")
    assert again.tokens == generate(model, other, max_new_tokens=12).tokens
    assert counters["stats"]["unique_graphs"] <= 4


def test_flushing_denormals_zeroes_them_inside_and_restores_after():
    from zoo.infer.generate import flushing_denormals

    tiny = torch.tensor([1e-39], dtype=torch.float32)  # a denormal float32
    supported = torch.set_flush_denormal(False)  # x86: True (and leaves the default, off)
    with flushing_denormals():
        inside = (tiny * 1.0).item()
    assert (tiny * 1.0).item() != 0.0
    if supported:
        assert inside == 0.0
    with flushing_denormals(enabled=False):
        assert (tiny * 1.0).item() != 0.0


@pytest.mark.slow
def test_compiled_step_follows_a_change_of_dtype(make_model):
    """Module guards are skipped for speed, so a .to() (same parameter objects) must not reuse
    the step compiled for the old dtype."""
    model = make_model("rwkv4-tiny")
    prompts = _prompts([4], seed=3)
    generate(model, prompts, max_new_tokens=4, compile=True)
    model.to(torch.float64)
    result = generate(model, prompts, max_new_tokens=4, compile=True, return_cache=True)
    assert result.tokens == generate(model, prompts, max_new_tokens=4).tokens
    assert result.cache.layers[0][0].tensors()[0].dtype == torch.float64


@pytest.mark.slow
def test_models_alike_in_their_states_keep_their_own_compiled_steps():
    """Two models whose caches match in every shape but whose FFNs differ: each compiled step
    must run its own model's graph (module guards are skipped, so dynamo alone would hand the
    second model the first one's graph)."""
    torch._dynamo.reset()
    prompts = _prompts([6], seed=4)
    for hidden_size in (96, 160):
        config = zoo.load_config("attention-tiny")
        config.ffn = {**config.ffn, "hidden_size": hidden_size}
        torch.manual_seed(0)
        model = zoo.ZooForCausalLM(config).eval()
        compiled = generate(model, prompts, max_new_tokens=6, compile="inductor")
        assert compiled.tokens == generate(model, prompts, max_new_tokens=6).tokens


@pytest.mark.slow
def test_a_copied_model_does_not_run_the_original_compiled_step(make_model):
    """Compiled steps close over their model: a deepcopy must compile its own."""
    import copy

    model = make_model("mamba-tiny")
    prompts = _prompts([5], seed=6)
    generate(model, prompts, max_new_tokens=5, compile=True)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(-1.5)
    assert generate(twin, prompts, max_new_tokens=5, compile=True).tokens == generate(
        twin, prompts, max_new_tokens=5).tokens


@pytest.mark.slow
@pytest.mark.parametrize(("name", "mode"), COMPILED_MODES)
def test_a_compiled_run_returns_the_states_eager_decoding_ends_with(name, mode, make_model,
                                                                   caches_equal):
    """The compiled loop carries the cache as tensors and ints; the cache it returns holds the
    states after the last step, as the eager loop's does."""
    model = make_model(name)
    prompts = _prompts([6, 6], seed=10)
    eager = generate(model, prompts, max_new_tokens=7, return_cache=True)
    compiled = generate(model, prompts, max_new_tokens=7, return_cache=True, compile=mode)
    assert compiled.tokens == eager.tokens
    assert compiled.cache.seen_tokens == eager.cache.seen_tokens
    caches_equal(compiled.cache, eager.cache)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "mode"), COMPILED_MODES)
def test_compiled_ragged_batch_with_stops_and_sampling_equals_eager(name, mode, make_model):
    """Catch-up rows (attention), merged prefill (Mamba), a row stopping early, and seeded
    sampling: the compiled loop emits what the eager loop emits."""
    model = make_model(name)
    prompts = _prompts([3, 8, 5], seed=11)
    stop = generate(model, prompts, max_new_tokens=9).tokens[1][2]  # row 1's third token
    greedy_with_stop = dict(max_new_tokens=9, stop_tokens=[stop])
    sampled = dict(max_new_tokens=9, temperature=0.9, top_k=20, seed=5)
    for kwargs in (greedy_with_stop, sampled):
        expected = generate(model, prompts, **kwargs)
        got = generate(model, prompts, compile=mode, **kwargs)
        assert got.tokens == expected.tokens
        assert got.finish_reasons == expected.finish_reasons
    assert "stop" in generate(model, prompts, **greedy_with_stop).finish_reasons


@pytest.mark.slow
def test_plain_greedy_picks_its_tokens_inside_the_compiled_step(make_model):
    """Greedy without a repetition penalty compiles a step that returns the argmax tokens;
    the penalty and sampling need the logits back. All three emit what the eager loop emits."""
    model = make_model("mamba-tiny")
    prompts = _prompts([5, 7], seed=12)
    for kwargs in ({}, {"repetition_penalty": 1.3}, {"temperature": 0.8, "seed": 1}):
        expected = generate(model, prompts, max_new_tokens=6, **kwargs).tokens
        assert generate(model, prompts, max_new_tokens=6, compile=True, **kwargs).tokens == expected
    picks_tokens = sorted(key[-1] for key in model.__dict__["_zoo_compiled_decode_steps"])
    assert picks_tokens == [False, True]


@pytest.mark.parametrize("on_cuda", [False, True])
def test_the_compile_options_are_accepted(on_cuda):
    """torch.compile refuses a mode together with options: the CUDA step once asked for both
    (every compiled CUDA decode failed)."""
    from zoo.infer.compiled import _compile_options

    step = torch.compile(lambda x: x * 2 + 1, dynamic=None, options=_compile_options(on_cuda))
    x = torch.randn(3)
    assert torch.equal(step(x), x * 2 + 1)
