import math

import torch

from zoo.app.bench.complexity import (
    FAMILIES,
    _registered,
    complexity_report,
    exponents,
    family_config,
    fit_exponent,
    theory,
)
from zoo.model import ZooForCausalLM


def test_fit_exponent_recovers_known_powers():
    ns = [256, 512, 1024, 2048]
    assert math.isclose(fit_exponent(ns, [n**2 * 3.0 for n in ns]), 2.0, rel_tol=1e-9)
    assert math.isclose(fit_exponent(ns, [5.0 for _ in ns]), 0.0, abs_tol=1e-9)
    # only the largest four points count: a constant overhead at small n is ignored
    ns = [128, 256, 512, 1024, 2048]
    assert math.isclose(fit_exponent(ns, [100.0, 256, 512, 1024, 2048]), 1.0, rel_tol=1e-9)


def test_fit_exponent_shrugs_off_one_disturbed_point():
    ns = [2048, 4096, 8192, 16384]
    linear = [n * 1e-4 for n in ns]
    linear[1] *= 0.75  # one fast outlier: least squares over the last three would say ~1.2
    assert abs(fit_exponent(ns, linear) - 1.0) < 0.05


def test_report_flags_disagreement_with_theory_and_with_the_survey():
    rows = []
    for n in (256, 512, 1024):
        rows.append({"family": "attention", "n": n, "train_s": n**2 * 1e-9,
                     "prefill_s": n**2 * 1e-9, "decode_s_per_token": n * 1e-6,
                     "state_bytes": n * 100, "train_peak_bytes": n * 1000})
        rows.append({"family": "mamba", "n": n, "train_s": n * 1e-6, "prefill_s": n**2 * 1e-9,
                     "decode_s_per_token": 1e-4, "state_bytes": 4096, "train_peak_bytes": 1})
    fits = exponents(rows)
    assert round(fits["attention"]["decode"], 6) == 1.0 and round(fits["mamba"]["state"], 6) == 0
    report = complexity_report(rows)
    attention_line = next(line for line in report.splitlines() if line.startswith("| attention |"))
    assert "1.00 / 1 / 2 survey≠" in attention_line  # KV-cache decode is O(n d), not O(n^2 d)
    mamba_line = next(line for line in report.splitlines() if line.startswith("| mamba |"))
    assert "2.00 ! (last doubling 2.00) / 1" in mamba_line  # a quadratic prefill is flagged


def test_the_speculative_row_is_reported_and_kept_out_of_the_fits():
    rows = [{"family": "mamba", "n": n, "train_s": n * 1e-6, "prefill_s": n * 1e-7,
             "decode_s_per_token": 1e-4, "state_bytes": 4096, "train_peak_bytes": 1}
            for n in (256, 512, 1024)]
    rows.append({"family": "speculative", "target": "t", "draft_layers": 10, "k": 4,
                 "acceptance_rate": 0.25, "tokens_per_round": 1.5, "plain_ms_per_token": 30.0,
                 "speculative_ms_per_token": 40.0, "speedup": 0.75, "identical_to_plain": True})
    assert set(exponents(rows)) == {"mamba"}
    report = complexity_report(rows)
    assert "acceptance 25.0%" in report and "speed-up 0.75x" in report
    assert "identical to plain greedy" in report


@torch.no_grad()
def test_rwkv7_is_a_bounded_family_beside_rwkv6():
    families = list(FAMILIES)
    assert families.index("rwkv7") == families.index("rwkv6") + 1
    assert _registered("rwkv7")
    assert theory("rwkv7") == {"train": 1, "prefill": 1, "decode": 0, "state": 0}
    model = ZooForCausalLM(family_config("rwkv7")).eval()
    assert [type(b.mixer).registry_name for b in model.model.layers] == ["rwkv7", "rwkv7"]
    assert model(torch.zeros(1, 4, dtype=torch.long)).logits.shape == (1, 4, 256)
