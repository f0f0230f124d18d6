import pytest
import torch

from zoo.app.decode_timer import DecodeTiming, time_decode, weight_bytes
from zoo.infer.generate import prefill
from zoo.model import ZooForCausalLM


def test_times_the_decode_loop_not_the_forward_with_its_host_check(make_model, monkeypatch):
    model = make_model("mamba-tiny")

    def no_forward(*args, **kwargs):
        raise AssertionError("the timer must drive zoo.infer's decode step, not forward()")

    monkeypatch.setattr(ZooForCausalLM, "forward", no_forward)
    timing = time_decode(model, 16, 6)
    assert timing.context == 16 and timing.ms_per_token > 0
    assert timing.min_ms_per_token <= timing.ms_per_token


def test_reports_state_weights_and_achieved_bandwidth(make_model):
    model = make_model("attention-tiny")
    timing = time_decode(model, 40, 5)
    assert timing.state_bytes == prefill(model, [[1] * 40]).cache.nbytes()
    assert timing.weight_bytes == weight_bytes(model)
    assert timing.achieved_GB_per_s == pytest.approx(
        (timing.weight_bytes + timing.state_bytes) / (timing.ms_per_token * 1e6))
    assert timing.read_GB_per_s is None and timing.x_bound is None
    assert "GB/s" in timing.summary()


def test_synthetic_past_gives_the_state_a_real_prefill_would(make_model):
    model = make_model("attention-tiny")
    real = time_decode(model, 300, 3)
    grown = time_decode(model, 300, 3, real_prefill=32)
    assert grown.state_bytes == real.state_bytes and grown.context == 300


def test_bound_from_a_measured_bandwidth():
    timing = DecodeTiming(context=1, ms_per_token=2.0, min_ms_per_token=2.0, state_bytes=0,
                          weight_bytes=10**9, read_GB_per_s=100.0)
    assert timing.bound_ms == pytest.approx(10.0) and timing.x_bound == pytest.approx(0.2)
    assert timing.achieved_GB_per_s == pytest.approx(500.0)


def test_measures_bandwidth_when_asked(make_model):
    timing = time_decode(make_model("rwkv4-tiny"), 8, 3, measure_bandwidth=True)
    assert timing.read_GB_per_s > 0 and timing.x_bound > 0
    assert torch.get_num_threads() >= 1
