"""Speculative decoding: a draft model proposes k tokens, the target checks them in one forward.

    result = zoo.infer.speculative_generate(target, draft, prompt, max_new_tokens=64, k=4)
    result.tokens, result.stats.acceptance_rate

Any two zoo models sharing a vocabulary work as (target, draft): the state contract is all this
uses. Lossless: greedy output is the target's greedy output token for token; sampled output
follows the target's distribution by the standard rejection scheme (Leviathan et al. 2023,
Chen et al. 2023): accept drafted token d with probability min(1, p(d) / q(d)), at the first
rejection draw from normalise(max(0, p - q)), after k acceptances draw a bonus token from p.

Rolling back. A recurrent state cannot subtract the rejected tokens, so each round keeps what
it needs to go back to the last accepted token:
- the draft decodes one token at a time and keeps a snapshot after each step (attention's and
  Hyena's append-only buffers are shared, not copied: an older state object stays valid until a
  second branch appends from it; every other state is cloned, which is cheap for bounded ones);
- the target keeps a snapshot from before its verify forward; after a rejection, a cache of
  plain attention is cut back to the accepted length (KV slots past it are simply ignored), any
  other cache is restored from the snapshot and the accepted tokens are fed again, in one
  parallel forward. The states after a round are those of plain decoding (tests/infer checks).
Batch size 1: rows of a batch would accept different numbers of tokens.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import torch

from zoo.cache import ZooCache
from zoo.layers.attention import AttentionState
from zoo.layers.hyena import HyenaState
from zoo.model import ZooForCausalLM

from .generate import check_length_limit, resolve_stop_tokens
from .prefill import normalize_prompts
from .sampling import SamplingConfig, probabilities, sample_from_probs
from .step import decode_step, forward_logits

# States whose older objects stay valid when a newer one appends (see their docstrings).
_APPEND_ONLY = (AttentionState, HyenaState)


@dataclasses.dataclass
class SpeculativeStats:
    drafted: int  # draft tokens proposed to the target
    accepted: int  # of which the target accepted
    rounds: int  # verify forwards of the target
    replays: int  # target forwards re-run to roll a recurrent state back
    generated_tokens: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        return self.generated_tokens / self.rounds if self.rounds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.generated_tokens / self.decode_seconds if self.decode_seconds else 0.0

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "acceptance_rate": self.acceptance_rate,
                "tokens_per_round": self.tokens_per_round,
                "decode_tokens_per_s": self.decode_tokens_per_s}


@dataclasses.dataclass
class SpeculativeResult:
    prompt: list[int]
    tokens: list[int]
    finish_reason: str  # "stop" or "length"
    stats: SpeculativeStats
    # The states after prompt + tokens[:-1] (the last token is not fed yet), as plain decoding
    # would leave them.
    target_cache: ZooCache
    draft_cache: ZooCache


def snapshot(cache: ZooCache) -> ZooCache:
    """A copy of `cache` that later steps on `cache` cannot change (see the module docstring)."""
    return cache._map(lambda s: s if isinstance(s, _APPEND_ONLY) else s.clone())


def _truncatable(cache: ZooCache) -> bool:
    """Every state is attention without a window (a KV cache is cut back by its length)."""
    return all(
        isinstance(layer[0], AttentionState) and layer[0].window is None and layer[1] is None
        for layer in cache.layers
    )


def _truncate(cache: ZooCache, drop: int) -> None:
    for i, (state, ffn_state) in enumerate(cache.layers):
        cache.layers[i] = (dataclasses.replace(
            state, length=state.length - drop, position=state.position - drop), ffn_state)
    cache.seen_tokens -= drop


def rollback(
    model: ZooForCausalLM, cache: ZooCache, before: ZooCache, fed: torch.Tensor, keep: int
) -> ZooCache:
    """`cache` consumed `before`'s tokens plus fed (1, T); return the states after only the first
    `keep` of those T tokens."""
    T = fed.shape[1]
    if keep == T:
        return cache
    if _truncatable(cache):
        _truncate(cache, T - keep)
        return cache
    decode_step(model, fed[:, :keep], before)  # keep >= 1: the last accepted token at least
    return before


def accept_drafts(
    p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """The rejection scheme. p: (k + 1, V) target probabilities, q: (k, V) draft probabilities,
    drafted: (k,) tokens drawn from q. Returns (accepted count n, the token that follows them),
    which together are distributed as the target alone would sample. With one-hot (greedy) p and
    q it accepts exactly the drafts the target's argmax agrees with.
    """
    k = drafted.shape[0]
    rows = torch.arange(k, device=p.device)
    ratio = p[rows, drafted] / q[rows, drafted]
    uniform = torch.rand(k, generator=generator, device=p.device)
    accepted = int(torch.cumprod((uniform < ratio).int(), 0).sum())  # the one sync per round
    if accepted == k:
        return k, int(sample_from_probs(p[k : k + 1], generator))
    residual = (p[accepted] - q[accepted]).clamp_min(0)
    total = residual.sum()
    # p == q at this position leaves no residual mass; the rejection then had probability 0.
    residual = residual / total if total > 0 else p[accepted]
    return accepted, int(sample_from_probs(residual[None], generator))


@torch.no_grad()
def speculative_generate(
    target: ZooForCausalLM,
    draft: ZooForCausalLM,
    prompt: Sequence[int] | torch.Tensor,
    *,
    max_new_tokens: int = 32,
    k: int = 4,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: int | Sequence[int] | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int | None = None,
) -> SpeculativeResult:
    """Generate from `target` with `draft` proposing k tokens a round (one prompt)."""
    if target.config.vocab_size != draft.config.vocab_size:
        raise ValueError(
            f"draft vocab_size={draft.config.vocab_size} != target vocab_size="
            f"{target.config.vocab_size}: the two models must share a tokenizer"
        )
    if k < 1:
        raise ValueError(f"k={k} must be >= 1 drafted tokens per round")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    rows = normalize_prompts(prompt, target.config.vocab_size)
    if len(rows) != 1:
        raise ValueError(f"speculative decoding takes one prompt, got {len(rows)}")
    prompt_ids = rows[0]
    # a round feeds both models k drafted tokens past the last accepted one
    for model in (target, draft):
        check_length_limit(model, len(prompt_ids), max_new_tokens + k)
    sampling = SamplingConfig(temperature, top_k, top_p)
    stops = set(resolve_stop_tokens(target, stop_tokens, eos_token_id))
    device = target.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    modes = (target.training, draft.training)
    target.eval()
    draft.eval()
    try:
        return _speculate(target, draft, prompt_ids, max_new_tokens, k, sampling, stops,
                          generator)
    finally:
        target.train(modes[0])
        draft.train(modes[1])


def _speculate(target, draft, prompt_ids, max_new_tokens, k, sampling, stops, generator):
    device = target.device
    start = time.perf_counter()
    ids = torch.tensor([prompt_ids], device=device)
    target_cache, draft_cache = target.new_cache(), draft.new_cache()
    p0 = probabilities(decode_step(target, ids, target_cache), sampling)
    decode_step(draft, ids, draft_cache)
    out = [int(sample_from_probs(p0, generator))]
    pending = out[:]  # tokens the draft has not consumed yet (the target: only out[-1])
    prefill_seconds = time.perf_counter() - start
    stats = SpeculativeStats(0, 0, 0, 0, 0, prefill_seconds, 0.0)
    start = time.perf_counter()
    while len(out) < max_new_tokens and out[-1] not in stops:
        # Draft k tokens, one step each, keeping the state after each step.
        # drafts[0] is the last accepted token; drafted ones follow.
        drafts = torch.empty(k + 1, dtype=torch.long, device=device)
        drafts[0] = out[-1]
        q = torch.empty(k, target.config.vocab_size, device=device)
        draft_states = []
        inputs = torch.tensor([pending], device=device)
        for i in range(k):
            logits = decode_step(draft, inputs, draft_cache)
            if i < k - 1:
                draft_states.append(snapshot(draft_cache))
            q[i] = probabilities(logits, sampling)[0]
            drafts[i + 1] = sample_from_probs(q[i : i + 1], generator)[0]
            inputs = drafts[i + 1 : i + 2][None]
        draft_states.append(draft_cache)  # after drafts[0..k-1]
        # Verify all k in one parallel forward of the target.
        before = snapshot(target_cache)
        fed = drafts[None]  # (1, k + 1): the last accepted token and the drafts
        p = probabilities(forward_logits(target, fed, target_cache)[0], sampling)
        n, following = accept_drafts(p, q, drafts[1:], generator)
        stats.rounds += 1
        stats.drafted += k
        stats.accepted += n
        new = drafts[1 : n + 1].tolist() + [following]
        # Cut at a stop token or the token budget; keep = tokens of this round that stay.
        keep = min(len(new), max_new_tokens - len(out))
        for j, token in enumerate(new[:keep]):
            if token in stops:
                keep = j + 1
                break
        new = new[:keep]
        out += new
        # Both models must have consumed drafts[0] and new[:-1], i.e. fed[:, :keep].
        if keep < k + 1:
            stats.replays += int(not _truncatable(target_cache))
        target_cache = rollback(target, target_cache, before, fed, keep)
        if keep <= k:
            draft_cache, pending = draft_states[keep - 1], [new[-1]]
        else:  # all k accepted: the draft has not seen the last draft yet, nor the bonus token
            pending = [int(drafts[k]), new[-1]]
    stats.decode_seconds = time.perf_counter() - start
    stats.generated_tokens = len(out)
    if len(pending) == 2:  # leave the draft where plain decoding would: before out[-1]
        decode_step(draft, torch.tensor([pending[:1]], device=device), draft_cache)
    reason = "stop" if out[-1] in stops else "length"
    return SpeculativeResult(prompt_ids, out, reason, stats, target_cache, draft_cache)
