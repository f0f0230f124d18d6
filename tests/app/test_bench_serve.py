"""`zoo bench serve`: its workload, statistics and report, and one quick run against a real
`zoo serve` subprocess."""

import json

import pytest

from zoo.app.bench.serve import (
    Timing,
    level_row,
    memory_per_sequence,
    percentile,
    serve_report,
    server_timing,
    workload,
)
from zoo.app.cli import main


def test_the_workload_is_the_same_for_every_model_and_within_its_ranges():
    first = workload(20, vocab_size=100, seed=3, prompt_tokens=(4, 9), output_tokens=(2, 5))
    assert first == workload(20, vocab_size=100, seed=3, prompt_tokens=(4, 9),
                             output_tokens=(2, 5))
    assert first != workload(20, vocab_size=100, seed=4, prompt_tokens=(4, 9),
                             output_tokens=(2, 5))
    assert all(4 <= len(p) <= 9 and 2 <= out <= 5 and max(p) < 100 for p, out in first)
    assert len({len(p) for p, _ in first}) > 1 and len({out for _, out in first}) > 1


def test_percentiles_interpolate_between_the_ordered_values():
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([4.0, 1.0, 2.0, 3.0], 0.5) == 2.5
    assert percentile([1.0, 2.0, 3.0], 1.0) == 3.0
    assert percentile(list(map(float, range(101))), 0.99) == pytest.approx(99.0)


def test_memory_per_sequence_shares_the_kv_bytes_and_adds_one_state():
    samples = [{"engine": {"active": 0}},
               {"engine": {"active": 2, "kv_bytes_in_use": 1000, "state_bytes_per_sequence": 7}},
               {"engine": {"active": 4, "kv_bytes_in_use": 1000, "state_bytes_per_sequence": 7}}]
    assert memory_per_sequence(samples) == 507
    assert memory_per_sequence([{"engine": {"active": 0}}]) is None


def test_a_level_row_counts_tokens_over_the_wall_time_and_times_each_request():
    # request 1: sent at 0, first token at 0.1, its 5th and last at 0.5 -> 100 ms per token
    timings = [Timing(sent=0.0, first=0.1, last=0.5, tokens=5),
               Timing(sent=0.0, first=0.3, last=0.3, tokens=1)]
    row = level_row("m", 2, timings, wall=2.0, samples=[])
    assert row["tokens_per_s"] == 3.0 and row["output_tokens"] == 6
    assert row["ttft_p50_ms"] == pytest.approx(200.0)
    assert row["ms_per_token_p50"] == pytest.approx(100.0)  # one token has no interval
    assert row["MB_per_active_sequence"] is None


def test_server_timing_differences_the_levels_first_and_last_health_readings():
    def reading(steps, step_ms, chunks, write_ms, loop_cpu_s):
        return {"engine": {"active": 1}, "timing": {
            "steps": steps, "step_ms_total": step_ms, "chunks": chunks,
            "step_to_write_ms_total": write_ms, "cpu_s": {"event_loop": loop_cpu_s}}}

    # 10 steps of 4 ms and 40 chunks 1.5 ms each after their step, 20 ms of loop CPU
    samples = [reading(5, 100.0, 8, 20.0, 1.0), reading(9, 116.0, 30, 50.0, 1.01),
               reading(15, 140.0, 48, 80.0, 1.02)]
    timing = server_timing(samples)
    assert timing["server_step_ms"] == pytest.approx(4.0)
    assert timing["step_to_write_ms"] == pytest.approx(1.5)
    assert timing["loop_cpu_ms_per_chunk"] == pytest.approx(0.5)
    # a server without timing (an older zoo serve), or one reading: nothing claimed
    assert set(server_timing([{"engine": {}}, {"engine": {}}]).values()) == {None}
    assert set(server_timing(samples[:1]).values()) == {None}


def test_the_report_gives_the_speed_up_over_one_stream():
    rows = [{"model": "m", "server": "zoo serve", "clients": c, "tokens_per_s": t,
             "MB_per_active_sequence": 1.5} for c, t in ((1, 10.0), (16, 85.0))]
    report = serve_report(rows)
    assert "x8.5 one stream's 10.0" in report and "at 16 clients x8.5" in report


@pytest.mark.slow
def test_bench_serve_quick_streams_from_a_real_server(tmp_path):
    assert main(["bench", "serve", "--quick", "--out", str(tmp_path), "--no-plot"]) == 0
    rows = json.loads((tmp_path / "serve.json").read_text())["rows"]
    assert [r["clients"] for r in rows] == [1, 2]
    for row in rows:
        assert row["model"] == "mamba2-tiny" and row["server"] == "zoo serve"
        # every request ran to its max_tokens (ignore_eos): 2 requests of 4 to 8 tokens
        assert row["requests"] == 2 and 8 <= row["output_tokens"] <= 16
        assert row["tokens_per_s"] > 0 and row["ttft_p50_ms"] > 0
        assert row["server_step_ms"] > 0 and row["step_to_write_ms"] > 0
        assert row["loop_cpu_ms_per_chunk"] > 0
