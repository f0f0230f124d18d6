"""Bounded states stored in bfloat16 / int8 between decode steps (zoo.infer.state_quant)."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import zoo
from zoo.infer import generate
from zoo.infer.prefill import prefill
from zoo.infer.state_quant import (
    KEPT_FLOAT,
    NOT_TOLERATED,
    STATE_DTYPES,
    STORED_FIELDS,
    TOLERATED_ERROR,
    StoredState,
    quantize_int8,
    restore_cache,
    store_cache,
    store_tensor,
)
from zoo.infer.step import decode_step
from zoo.layers.mamba import MambaState
from zoo.model import ZooForCausalLM

PROMPTS = [[5, 17, 99, 3, 42, 7], [8, 250, 1]]


def tiny_model(name: str, **overrides) -> ZooForCausalLM:
    torch.manual_seed(0)
    return ZooForCausalLM(zoo.load_config(name, **overrides)).eval()


def states(cache):
    return [s for layer in cache.layers if layer for s in layer if s is not None]


def test_int8_round_trip_within_half_a_scale():
    torch.manual_seed(0)
    # rows five orders of magnitude apart, and an all-zero row: the per-row scale handles each
    x = torch.randn(2, 3, 8, 16) * torch.logspace(-3, 2, 8)[:, None]
    x[0, 0, 0] = 0.0
    for dtype in (torch.float32, torch.float64):
        stored = quantize_int8(x.to(dtype))
        assert stored.codes.dtype == torch.int8 and stored.scale.dtype == torch.float32
        assert stored.scale.shape == (2, 3, 8, 1)
        assert int(stored.codes.abs().max()) <= 127
        restored = stored.restore()
        assert restored.dtype == dtype
        error = (restored - x.to(dtype)).abs()
        assert (error <= stored.scale * 0.5 * (1 + 1e-6)).all()
        assert torch.equal(restored[0, 0, 0], torch.zeros(16, dtype=dtype))


def test_bfloat16_round_trip_within_its_unit_roundoff():
    x = torch.randn(4, 64) * 1e3
    restored = store_tensor(x, "bfloat16").restore()
    assert restored.dtype == torch.float32
    assert ((restored - x).abs() <= x.abs() * 2.0**-8).all()


def test_stored_bytes_are_what_they_say():
    """Mamba-tiny: per layer a float32 conv window (3, 128) kept float and an SSM state
    (128, 16) stored: bfloat16 2 bytes each, int8 1 byte each plus a float32 scale per row."""
    model = tiny_model("mamba-tiny")
    conv, ssm, rows = 3 * 128 * 4, 128 * 16, 128
    expected = {None: 2 * (conv + 4 * ssm), "bfloat16": 2 * (conv + 2 * ssm),
                "int8": 2 * (conv + ssm + 4 * rows)}
    for state_dtype, nbytes in expected.items():
        cache = prefill(model, PROMPTS[:1]).cache
        if state_dtype is not None:
            store_cache(cache, state_dtype)
            assert all(isinstance(s, StoredState) for s in states(cache))
        assert cache.nbytes() == nbytes, state_dtype
        result = generate(model, PROMPTS, max_new_tokens=2, state_dtype=state_dtype)
        assert result.stats.state_bytes == nbytes, state_dtype


def test_store_keeps_conv_window_exact_and_rows_selectable():
    model = tiny_model("mamba-tiny")
    cache = prefill(model, PROMPTS[:1] * 2).cache
    before = states(cache)
    store_cache(cache, "int8")
    stored = states(cache)[0]
    assert stored.values["conv_state"] is before[0].conv_state
    # beam search reorders stored rows as it reorders float ones
    picked = cache.index_select(torch.tensor([1])).layers[0][0].restore()
    assert isinstance(picked, MambaState) and picked.batch_size == 1
    restore_cache(cache)
    after = states(cache)[0]
    assert isinstance(after, MambaState)
    assert torch.equal(after.conv_state, before[0].conv_state)
    assert not torch.equal(after.ssm_state, before[0].ssm_state)  # it was really stored


# Families the policy stores, with the formats that keep greedy tokens: `zoo bench state-quant`
# measured their logits within 1% (max over 256 steps) of the float state's and no greedy
# divergence in 256 steps on these random tiny models; 16 steps leave a wide margin.
TOLERATED = [
    ("mamba-tiny", {}, "bfloat16"), ("mamba-tiny", {}, "int8"),
    ("mamba2-tiny", {}, "bfloat16"), ("mamba2-tiny", {}, "int8"),
    ("rwkv7-tiny", {}, "bfloat16"), ("rwkv7-tiny", {}, "int8"),
    ("rwkv6-tiny", {}, "bfloat16"),
    ("linear-attention-tiny",
     {"mixer": {"type": "window_linear_attention", "n_heads": 4, "window": 4}}, "bfloat16"),
]


@pytest.mark.parametrize(("name", "overrides", "state_dtype"), TOLERATED)
def test_stored_states_keep_the_greedy_tokens(name, overrides, state_dtype):
    model = tiny_model(name, **overrides)
    reference = generate(model, PROMPTS, max_new_tokens=16, return_cache=True)
    stored = generate(model, PROMPTS, max_new_tokens=16, state_dtype=state_dtype,
                      return_cache=True)
    assert stored.tokens == reference.tokens
    assert stored.stats.state_bytes < reference.stats.state_bytes
    # the returned cache holds the states the mixers read, and they were really rounded
    assert not any(isinstance(s, StoredState) for s in states(stored.cache))
    pairs = zip(states(stored.cache), states(reference.cache))
    assert any(not torch.equal(a, b) for x, y in pairs for a, b in zip(x.tensors(), y.tensors()))


# A family the policy keeps float under a format stays bit-exact: tokens, states and bytes.
BOUNDED_STATES = tuple({**STORED_FIELDS, **KEPT_FLOAT})
FLOAT_FAMILIES = [
    ("linear-attention-tiny", "bfloat16"), ("linformer-tiny", "int8"),
    ("retnet-tiny", "bfloat16"), ("deltanet-tiny", "int8"), ("kda-tiny", "bfloat16"),
    ("rwkv4-tiny", "int8"), ("rwkv6-tiny", "int8"), ("attention-tiny", "int8"),
]


@pytest.mark.parametrize(("name", "state_dtype"), FLOAT_FAMILIES)
def test_a_family_kept_float_stays_bit_exact(name, state_dtype):
    model = tiny_model(name)
    reference = generate(model, PROMPTS, max_new_tokens=8, return_cache=True)
    stored = generate(model, PROMPTS, max_new_tokens=8, state_dtype=state_dtype,
                      return_cache=True)
    assert stored.tokens == reference.tokens
    assert stored.stats.state_bytes == reference.stats.state_bytes
    for a, b in zip(states(stored.cache), states(reference.cache)):
        if not isinstance(a, BOUNDED_STATES):
            continue  # a KV cache's unfilled slots are uninitialised: the next logits check it
        for f in dataclasses.fields(a):
            x, y = getattr(a, f.name), getattr(b, f.name)
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, f.name
    with torch.no_grad():
        next_ids = torch.tensor([[1], [2]])
        assert torch.equal(decode_step(model, next_ids, stored.cache),
                           decode_step(model, next_ids, reference.cache))


def test_every_refusal_names_a_reason():
    assert set(NOT_TOLERATED) == {"bfloat16", "int8"}
    assert all(reason for refused in NOT_TOLERATED.values() for reason in refused.values())


def test_bad_state_dtype_is_named():
    model = tiny_model("mamba-tiny")
    with pytest.raises(ValueError, match=r"state_dtype='float8'.*'bfloat16', 'int8'"):
        generate(model, PROMPTS, max_new_tokens=2, state_dtype="float8")
    with pytest.raises(ValueError, match=r"state_dtype='int8'.*compile=False"):
        generate(model, PROMPTS, max_new_tokens=2, state_dtype="int8", compile=True)


def test_policy_agrees_with_the_committed_measurement():
    """benchmarks/results/cpu/state-quant.json: a family's sums are stored under a format
    exactly when their measured error (max over steps, worst size) is within TOLERATED_ERROR."""
    path = Path(__file__).resolve().parents[2] / "benchmarks/results/cpu/state-quant.json"
    worst: dict[tuple[str, str], float] = {}
    kept: dict[tuple[str, str], bool] = {}
    for row in json.loads(path.read_text())["rows"]:
        if "stopped" in row or row["stored"] != "sums":
            continue
        if row["stored_state_bytes"] == row["float_state_bytes"]:
            continue  # nothing of its sums is storable (RWKV-4: KEPT_FLOAT)
        key = (row["family"], row["state_dtype"])
        worst[key] = max(worst.get(key, 0.0), row["rel_error_max"])
        kept[key] = row["policy_state_bytes"] == row["float_state_bytes"]
    assert {dtype for _, dtype in worst} == set(STATE_DTYPES)
    for key, error in worst.items():
        assert kept[key] == (error > TOLERATED_ERROR), (key, error)


def test_bench_quick_run_reports_each_format(tmp_path):
    from zoo.app.bench import BenchOptions, load_entries, run_bench

    load_entries()
    record = run_bench("state-quant", BenchOptions(quick=True, only=("mamba",),
                                                   out_dir=tmp_path))
    rows = record["rows"]
    assert {(r["state_dtype"], r["stored"]) for r in rows} == {
        (d, s) for d in STATE_DTYPES for s in ("sums", "everything")}
    assert all(r["stored_state_bytes"] < r["float_state_bytes"] for r in rows)
    assert "| mamba |" in record["report"]
