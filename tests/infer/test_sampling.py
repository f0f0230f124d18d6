"""The sampling functions against transformers' logits processors, and the sampler's law."""

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from zoo.infer.sampling import (
    SamplingConfig,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    choose_tokens,
    probabilities,
    process_logits,
    sample_from_probs,
)


def _logits(B=4, V=50, seed=0):
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("k", [1, 5, 49, 50, 80])
def test_top_k_equals_transformers(k):
    logits = _logits()
    expected = TopKLogitsWarper(top_k=k)(None, logits.clone())
    got = apply_top_k(logits, k)
    assert torch.equal(got, expected)
    assert (got > float("-inf")).sum(-1).tolist() == [min(k, 50)] * 4


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9, 0.999, 1.0])
def test_top_p_equals_transformers(p):
    logits = _logits()
    expected = TopPLogitsWarper(top_p=p)(None, logits.clone())
    assert torch.equal(apply_top_p(logits, p), expected)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = apply_top_p(logits, 0.75) > float("-inf")
    assert kept.tolist() == [[True, True, False, False]]
    kept = apply_top_p(logits, 0.1) > float("-inf")  # the top token alone already reaches 0.1
    assert kept.tolist() == [[True, False, False, False]]


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_equals_transformers(penalty):
    logits = _logits(B=2)
    history = torch.tensor([[1, 4, 4, 9, 0], [7, 7, 7, 2, 30]])
    seen = torch.zeros(2, 50, dtype=torch.bool)
    seen[torch.arange(2)[:, None], history] = True
    expected = RepetitionPenaltyLogitsProcessor(penalty=penalty)(history, logits.clone())
    assert torch.equal(apply_repetition_penalty(logits, seen, penalty), expected)


def test_processing_order_equals_transformers_chain():
    logits = _logits(B=3)
    history = torch.tensor([[1, 2], [3, 4], [5, 5]])
    seen = torch.zeros(3, 50, dtype=torch.bool)
    seen[torch.arange(3)[:, None], history] = True
    config = SamplingConfig(temperature=0.7, top_k=10, top_p=0.8, repetition_penalty=1.2)
    expected = logits.clone()
    for proc in (RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.7),
                 TopKLogitsWarper(10), TopPLogitsWarper(0.8)):
        expected = proc(history, expected)
    torch.testing.assert_close(process_logits(logits, config, seen), expected)


def test_temperature_sharpens_and_flattens():
    logits = _logits(B=1)
    entropy = {}
    for t in (0.3, 1.0, 3.0):
        probs = probabilities(logits, SamplingConfig(temperature=t))
        entropy[t] = float(-(probs * probs.clamp_min(1e-30).log()).sum())
    assert entropy[0.3] < entropy[1.0] < entropy[3.0]


def test_greedy_is_argmax_and_a_one_hot_distribution():
    logits = _logits()
    config = SamplingConfig()
    assert torch.equal(choose_tokens(logits, config), logits.argmax(-1))
    probs = probabilities(logits, config)
    assert torch.equal(probs.argmax(-1), logits.argmax(-1)) and torch.all(probs.sum(-1) == 1)


def test_sampler_draws_from_the_distribution():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    N = 40_000
    draws = sample_from_probs(probs.expand(N, -1).contiguous(),
                              torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=5).float() / N
    # 4.5 standard deviations of a binomial frequency at p = 0.5
    assert torch.allclose(freq, probs, atol=4.5 * (0.25 / N) ** 0.5)
    assert freq[4] == 0  # zero-probability tokens are never drawn


def test_top_k_sampling_only_draws_the_top_k():
    logits = _logits(B=1).expand(2000, -1).contiguous()
    config = SamplingConfig(temperature=1.5, top_k=3)
    draws = choose_tokens(logits, config, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == set(logits[0].topk(3).indices.tolist())


def test_seeded_sampling_is_reproducible():
    logits = _logits()
    config = SamplingConfig(temperature=1.0, top_p=0.9)
    a = [choose_tokens(logits, config, g) for g in [torch.Generator().manual_seed(5)] * 10]
    b = [choose_tokens(logits, config, g) for g in [torch.Generator().manual_seed(5)] * 10]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("field, value", [
    ("temperature", -1.0), ("top_k", 0), ("top_p", 0.0), ("top_p", 1.5),
    ("repetition_penalty", 0.0), ("temperature", float("nan")), ("top_p", float("nan")),
    ("repetition_penalty", float("nan")), ("repetition_penalty", float("inf")),
])
def test_bad_sampling_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**{field: value})
