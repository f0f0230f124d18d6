"""The decode benchmarks' reports: what they conclude from the rows they are given."""

from zoo.app.bench.decode import decode_report, smollm2_report


def _row(config, context, eager, compiled, peer_ms=None, bounded=True):
    return {"config": config, "context": context, "zoo_ms_per_token": eager,
            "zoo_compiled_ms": compiled, "hf_generate_on_zoo_ms": 0.5,
            "speedup_vs_hf_loop": 0.5 / compiled, "peer": "MambaForCausalLM" if peer_ms else None,
            "peer_ms_per_token": peer_ms,
            "speedup_vs_peer": peer_ms / compiled if peer_ms else None, "bounded": bounded}


def test_decode_report_judges_flatness_and_the_speedup_over_the_peer():
    rows = [_row("mamba-tiny", 128, 0.30, 0.070, peer_ms=0.70),
            _row("mamba-tiny", 8192, 0.31, 0.075, peer_ms=0.71),
            _row("attention-tiny", 128, 0.30, 0.10, bounded=False),
            _row("attention-tiny", 8192, 0.90, 0.60, bounded=False),
            {"config": "hyena-tiny", "context": 8192, "note": "past max_len"}]
    report = decode_report(rows)
    mamba = next(line for line in report.splitlines() if line.startswith("mamba-tiny:"))
    assert "compiled 0.070 -> 0.075 ms/token (x1.07, flat within 10%: yes)" in mamba
    assert "x9.5 to x10.0 per token (target x5)" in mamba
    attention = next(line for line in report.splitlines() if line.startswith("attention-tiny:"))
    assert "flat within" not in attention  # a KV cache is not expected to be flat
    assert "x6.00" in attention


def test_smollm2_report_gives_both_bounds():
    rows = [{"model": "smollm2-135m", "dtype": "float32", "mode": "transformers generate",
             "context": 128, "zoo_ms_per_token": 30.0},
            {"model": "smollm2-135m", "dtype": "float32", "mode": "zoo compiled", "context": 128,
             "zoo_ms_per_token": 10.0, "weight_MB": 540.0, "read_GB_per_s_best": 80.0,
             "bound_ms": 9.0, "bound_best_ms": 6.75, "x_bound": 1.11, "x_bound_best": 1.48}]
    report = smollm2_report(rows)
    assert "(x1.11, median over runs)" in report
    assert "6.75 ms at the best bandwidth seen, 80 GB/s (x1.48; target x1.3)" in report
