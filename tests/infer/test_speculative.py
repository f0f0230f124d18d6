"""Speculative decoding: greedy output identical to the target alone, states after rejections
equal to plain decoding's, and the rejection scheme keeping the target's distribution."""

import copy

import pytest
import torch

import zoo
from zoo.infer import generate, speculative_generate
from zoo.infer.generate import decode_step
from zoo.infer.speculative import accept_drafts

TINY = [name for name in zoo.shipped_configs() if name.endswith("-tiny")]
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]


def _perturbed(model, scale, seed=1):
    """A draft that mostly agrees with the target: the target with its weights jittered."""
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return draft


@pytest.mark.parametrize("name", TINY)
def test_greedy_output_is_the_targets_and_states_match_plain_decoding(
    name, make_model, caches_equal
):
    target = make_model(name)
    draft = _perturbed(target, 0.01)
    result = speculative_generate(target, draft, PROMPT, max_new_tokens=24, k=4)
    assert result.tokens == generate(target, PROMPT, max_new_tokens=24).tokens[0]
    stats = result.stats
    assert stats.accepted < stats.drafted  # rejections happened: the roll-back was exercised
    # After the run, both models hold the states plain decoding leaves after prompt + tokens[:-1].
    fed = torch.tensor([PROMPT + result.tokens[:-1]])
    with torch.no_grad():
        for model, cache in ((target, result.target_cache), (draft, result.draft_cache)):
            plain = model.new_cache()
            decode_step(model, fed, plain)
            caches_equal(cache, plain)
            # and they continue identically
            nxt = torch.tensor([[result.tokens[-1]]])
            torch.testing.assert_close(decode_step(model, nxt, cache),
                                       decode_step(model, nxt, plain), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("target_name, draft_name", [
    ("attention-tiny", "rwkv4-tiny"), ("rwkv6-tiny", "attention-tiny"),
    ("retnet-tiny", "hyena-tiny"),
])
def test_any_zoo_model_drafts_for_any_other(target_name, draft_name, make_model):
    target, draft = make_model(target_name), make_model(draft_name, seed=3)
    result = speculative_generate(target, draft, PROMPT, max_new_tokens=12, k=3)
    assert result.tokens == generate(target, PROMPT, max_new_tokens=12).tokens[0]


@pytest.mark.parametrize("k", [1, 2, 5])
def test_a_perfect_draft_is_always_accepted(k, make_model):
    target = make_model("linear-attention-tiny")
    result = speculative_generate(target, target, PROMPT, max_new_tokens=3 * (k + 1) + 1, k=k)
    assert result.stats.acceptance_rate == 1.0
    assert result.stats.rounds == 3 and result.stats.tokens_per_round == (3 * (k + 1) + 1) / 3
    assert result.tokens == generate(target, PROMPT, max_new_tokens=3 * (k + 1) + 1).tokens[0]


def test_sampled_with_the_target_as_draft_accepts_everything(make_model):
    target = make_model("rwkv6-tiny")
    result = speculative_generate(target, target, PROMPT, max_new_tokens=20, k=4,
                                  temperature=0.9, top_k=50, seed=0)
    assert result.stats.acceptance_rate == 1.0
    again = speculative_generate(target, target, PROMPT, max_new_tokens=20, k=4,
                                 temperature=0.9, top_k=50, seed=0)
    assert again.tokens == result.tokens


def test_stop_token_ends_speculation(make_model):
    target = make_model("attention-tiny")
    plain = generate(target, PROMPT, max_new_tokens=20).tokens[0]
    stop = plain[6]
    result = speculative_generate(target, _perturbed(target, 0.003), PROMPT, max_new_tokens=20,
                                  stop_tokens=stop)
    assert result.tokens == plain[: plain.index(stop) + 1] and result.finish_reason == "stop"


@pytest.mark.parametrize("k", [1, 3])
def test_rejection_scheme_keeps_the_target_distribution(k):
    """The first token out of a round is distributed as the target's p[0], whatever q is."""
    V, N = 6, 12_000
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(k + 1, V, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(k, V, generator=g) * 1.5, -1)
    counts = torch.zeros(V)
    for _ in range(N):
        drafted = torch.stack([torch.multinomial(q[i], 1, generator=g)[0] for i in range(k)])
        n, following = accept_drafts(p, q, drafted, g)
        counts[int(drafted[0]) if n > 0 else following] += 1
    freq = counts / N
    assert torch.allclose(freq, p[0], atol=4.5 * (0.25 / N) ** 0.5), (freq, p[0])


def test_mismatched_vocabularies_are_refused(make_model):
    target = make_model("attention-tiny")
    draft = zoo.ZooForCausalLM(zoo.load_config("attention-tiny", vocab_size=300))
    with pytest.raises(ValueError, match="vocab_size"):
        speculative_generate(target, draft, PROMPT, max_new_tokens=4)


def test_a_length_limit_is_checked_before_any_token(make_model):
    # Hyena takes max_len tokens; a round feeds k drafts past the last accepted token
    hyena = zoo.ZooForCausalLM(zoo.load_config(
        "hyena-tiny", mixer={**zoo.load_config("hyena-tiny").mixer, "max_len": 16})).eval()
    target = make_model("attention-tiny")
    with pytest.raises(ValueError, match="max_len|limit"):
        speculative_generate(target, hyena, [1, 2, 3], max_new_tokens=10, k=4)
    with pytest.raises(ValueError, match="max_len|limit"):
        speculative_generate(hyena, target, [1, 2, 3], max_new_tokens=10, k=4)
