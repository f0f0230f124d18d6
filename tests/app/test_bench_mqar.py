"""`zoo bench mqar`: the cells it trains, the order a budget runs them in, what it scores."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

from zoo.app.bench import BenchOptions, load_entries, mqar, run_bench
from zoo.train.synthetic import IGNORE, MQAR


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_answer_logits_are_the_full_logits_at_the_positions_before_each_answer():
    task = MQAR(mqar.VOCAB_SIZE, 64, 0, 4, query_gap_power=mqar.QUERY_GAP_POWER)
    ids, labels = task.train_batch(np.arange(3))
    torch.manual_seed(0)
    model = mqar.ZooForCausalLM(mqar.model_config("attention", 64, 64)).eval()
    with torch.no_grad():
        logits, targets = mqar.answer_logits(model, ids, labels)
        full = model(ids, use_cache=False).logits
    rows, answer_at = (labels != IGNORE).nonzero(as_tuple=True)
    assert len(targets) == 3 * 4
    # the logits that predict an answer are those of the key just before it
    torch.testing.assert_close(logits, full[rows, answer_at - 1])
    assert torch.equal(targets, ids[rows, answer_at])
    half = mqar.VOCAB_SIZE // 2
    assert bool(((targets >= half) & (ids[rows, answer_at - 1] < half)).all())
    for row, key, value in zip(rows.tolist(), ids[rows, answer_at - 1].tolist(), targets.tolist()):
        context = ids[row, : 2 * 4].tolist()
        assert context[context.index(key) + 1] == value  # the value paired with it in context


def test_accuracy_counts_answer_positions_only():
    task = MQAR(mqar.VOCAB_SIZE, 64, 0, 4)
    # sequences whose keys are all distinct, so that one key -> value table answers them all
    chosen, keys = [], set()
    for index in range(100):
        ids, _ = task.val_batch(np.arange(index, index + 1))
        mine = set(ids[0, 0:8:2].tolist())
        if not mine & keys:
            chosen.append(index)
            keys |= mine
        if len(chosen) == 5:
            break
    ids, labels = task.val_batch(np.array(chosen))
    rows, answer_at = (labels != IGNORE).nonzero(as_tuple=True)
    answers = torch.zeros(mqar.VOCAB_SIZE, dtype=torch.long)  # token 0 at every non-answer
    answers[ids[rows, answer_at - 1]] = ids[rows, answer_at]

    class Oracle(torch.nn.Module):
        """Predicts the value after each key, and token 0 everywhere else."""

        def model(self, ids):
            return ids, None, None

        def lm_head(self, hidden):
            return torch.nn.functional.one_hot(answers[hidden], mqar.VOCAB_SIZE).float()

    assert mqar.accuracy(Oracle(), ids, labels, batch_size=2) == 1.0  # 0 scored nowhere
    answers[ids[rows[0], answer_at[0] - 1]] = 0  # one answer of 20 wrong
    assert mqar.accuracy(Oracle(), ids, labels, batch_size=2) == pytest.approx(19 / 20)


def test_every_cell_is_planned_once_middle_length_smallest_width_first():
    families = mqar.available_families()
    assert {"attention", "linear_attention", "deltanet", "gated_deltanet", "mamba", "hyena"} \
        <= set(families)
    plan = mqar.cell_plan(families)
    expected = {(f, t, k, d) for f in families for t, k in mqar.SWEEP for d in mqar.D_MODELS}
    assert len(plan) == len(expected) == 9 * len(families) and set(plan) == expected
    first_round = plan[: len(families)]
    assert [cell[0] for cell in first_round] == families
    assert {cell[1:] for cell in first_round} == {(128, 8, 64)}
    assert {cell[1:] for cell in plan[len(families): 2 * len(families)]} == {(128, 8, 256)}


def test_every_family_builds_two_layers_without_ffn_at_every_width():
    for family in mqar.available_families():
        for d_model in mqar.D_MODELS:
            config = mqar.model_config(family, d_model, 256)
            assert config.n_layers == 2 and config.ffn is None and config.d_model == d_model
    with pytest.raises(ValueError, match="mqar family 'gpt' is not one of attention"):
        mqar.mixer_spec("gpt", 64, 64)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def _run_with_fake_cells(monkeypatch, budget_s, cell_seconds):
    """run_mqar with cells that 'train' for cell_seconds(family, seq_len, d_model) seconds
    of a fake clock: the budget logic alone."""
    clock = FakeClock()
    monkeypatch.setattr(mqar, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))

    def fake_cell(family, seq_len, kv_pairs, d_model, recipe, device="cpu"):
        spent = min(recipe.cell_s, cell_seconds(family, seq_len, d_model))
        clock.now += spent
        return {"family": family, "seq_len": seq_len, "kv_pairs": kv_pairs,
                "d_model": d_model, "accuracy": 0.5, "steps": 10, "train_s": spent,
                "stopped": "time" if spent == recipe.cell_s else "solved",
                "state_bytes": 1024}

    monkeypatch.setattr(mqar, "train_cell", fake_cell)
    return mqar.run_mqar(BenchOptions(budget_s=budget_s))


def test_a_small_budget_runs_the_first_cells_and_names_the_rest(monkeypatch, keep_threads):
    families = mqar.available_families()
    cell_s = mqar.Recipe.cell_s
    rows = _run_with_fake_cells(monkeypatch, 2.5 * cell_s, lambda *cell: cell_s)
    ran = [r for r in rows if r["accuracy"] is not None]
    assert [(r["family"], r["seq_len"], r["d_model"]) for r in ran] == [
        (families[0], 128, 64), (families[1], 128, 64)]
    assert len(rows) == 9 * len(families)
    assert all(r["stopped"] == "not run" for r in rows if r["accuracy"] is None)
    report = mqar.mqar_report(rows)
    assert f"Not run within the budget ({len(rows) - 2} cells)" in report
    assert f"{families[2]} T=128 d=64" in report


def test_cells_solved_early_leave_their_time_to_later_cells(monkeypatch, keep_threads):
    cell_s = mqar.Recipe.cell_s
    rows = _run_with_fake_cells(monkeypatch, 2.5 * cell_s,
                                lambda family, *_: 1.0 if family == "attention" else cell_s)
    assert sum(r["accuracy"] is not None for r in rows) > 2  # attention's cells cost 1 s


def test_a_large_budget_trains_every_cell_longer(monkeypatch, keep_threads):
    seen = []
    clock = FakeClock()
    monkeypatch.setattr(mqar, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))

    def fake_cell(family, seq_len, kv_pairs, d_model, recipe, device="cpu"):
        seen.append(recipe.cell_s)
        clock.now += recipe.cell_s
        return {"family": family, "seq_len": seq_len, "kv_pairs": kv_pairs, "d_model": d_model,
                "accuracy": 1.0, "steps": 1, "train_s": recipe.cell_s, "stopped": "time",
                "state_bytes": 1}

    monkeypatch.setattr(mqar, "train_cell", fake_cell)
    cells = 9 * len(mqar.available_families())
    rows = mqar.run_mqar(BenchOptions(budget_s=cells * 50.0))
    assert set(seen) == {50.0 * mqar.TRAIN_SHARE} and all(r["accuracy"] == 1.0 for r in rows)


def test_quick_run_writes_rows_table_and_plot(tmp_path, keep_threads):
    load_entries()
    record = run_bench("mqar", BenchOptions(quick=True, out_dir=tmp_path))
    rows = json.loads((tmp_path / "mqar.json").read_text())["rows"]
    assert [(r["family"], r["seq_len"], r["d_model"]) for r in rows] == [
        ("attention", 64, 64), ("linear_attention", 64, 64)]
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["steps"] == mqar.QUICK.steps
        assert row["stopped"] in ("steps", "solved") and row["state_bytes"] > 0
    table = (tmp_path / "mqar.md").read_text()
    assert "Sequence length 64, 4 key-value pairs" in table and "| attention | " in table
    assert record["png"] and (tmp_path / "mqar.png").stat().st_size > 0
