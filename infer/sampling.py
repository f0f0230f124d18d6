"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty.

Every function works on a batch of rows, logits (B, V), and never reads a value back to the host,
so the decode loop stays free of device syncs. The processing order and semantics are those of
transformers' logits processors (repetition penalty, then temperature, then top-k, then top-p),
so a sampled zoo generation and `model.generate(do_sample=True)` draw from the same distribution.
"""

from __future__ import annotations

import dataclasses
import math

import torch


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens. temperature 0 means greedy (argmax); top_k / top_p None means off."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self):
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):  # nan compares false to all
                raise ValueError(f"{name}={value} must be a finite number")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 means greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be a positive integer or None")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] or None")
        if self.repetition_penalty <= 0:
            raise ValueError(
                f"repetition_penalty={self.repetition_penalty} must be > 0 (1.0 means off)"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL's penalty as transformers applies it: for tokens already in the sequence, a positive
    logit is divided by `penalty` and a negative one multiplied. seen: (B, V) bool."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_top_k(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th are kept), -inf elsewhere."""
    if k is None or k >= logits.shape[-1]:
        return logits
    pivot = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < pivot, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filtering: keep the most probable tokens whose mass first reaches p.

    As transformers computes it: sort ascending, drop the tokens whose cumulative probability
    (counted from the least likely) stays <= 1 - p, always keep the most likely token.
    """
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= 1 - p
    remove_sorted[..., -1] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def process_logits(
    logits: torch.Tensor, config: SamplingConfig, seen: torch.Tensor | None = None
) -> torch.Tensor:
    """Repetition penalty (when `seen` is given), temperature, top-k, top-p: logits (B, V)."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    if config.greedy:
        return logits
    logits = logits / config.temperature
    return apply_top_p(apply_top_k(logits, config.top_k), config.top_p)


def probabilities(
    logits: torch.Tensor, config: SamplingConfig, seen: torch.Tensor | None = None
) -> torch.Tensor:
    """The distribution tokens are drawn from: (B, V), rows summing to 1 (one-hot when greedy)."""
    logits = process_logits(logits, config, seen)
    if config.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return logits.softmax(dim=-1)


def sample_from_probs(
    probs: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One token per row of probs (B, V), without torch.multinomial's host sync.

    argmax_i p_i / E_i with E_i ~ Exp(1) picks i with probability p_i: E_i / p_i is exponential
    with rate p_i, and the smallest of independent exponentials is i with probability
    p_i / sum(p). Zero-probability tokens get p_i / E_i = 0 and are never picked.
    """
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise.clamp_min(torch.finfo(noise.dtype).tiny)).argmax(dim=-1)


def choose_tokens(
    logits: torch.Tensor,
    config: SamplingConfig,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """The next token of each row: (B, V) logits -> (B,) token ids."""
    logits = process_logits(logits, config, seen)
    if config.greedy:
        return logits.argmax(dim=-1)
    return sample_from_probs(logits.softmax(dim=-1), generator)
