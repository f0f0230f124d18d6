"""Prompts and the prefill of a ragged batch (see zoo.infer.generate's docstring for why rows are
never padded): rows prefilled at their own lengths and merged, or a common prefix and catch-up."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence

import torch

from zoo.cache import ZooCache
from zoo.layers import MixerState
from zoo.model import ZooForCausalLM

from .step import decode_step

Prompts = Sequence[int] | Sequence[Sequence[int]] | torch.Tensor


def normalize_prompts(prompts: Prompts, vocab_size: int) -> list[list[int]]:
    """A list of token-id lists; a flat list or a 1-D tensor is one prompt. Ids are checked here,
    once, so the decode loop never validates."""
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        prompts = [prompts]
    rows = [list(map(int, row)) for row in prompts]
    if not rows:
        raise ValueError("prompts is empty: give at least one prompt of token ids")
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token")
        bad = [t for t in row if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(
                f"prompts[{i}] contains token id {bad[0]}, outside the vocabulary "
                f"[0, {vocab_size}) (config.vocab_size={vocab_size})"
            )
    return rows


def _merge_states(states: list[MixerState | None]) -> MixerState | None:
    """Concatenate per-group states along the batch, or raise ValueError when a field (a length,
    a buffer capacity) differs between groups."""
    if all(s is None for s in states):
        return None
    first = states[0]
    if any(s is None or type(s) is not type(first) for s in states):
        raise ValueError("states of different kinds")
    changes = {}
    for field in dataclasses.fields(first):
        values = [getattr(s, field.name) for s in states]
        if isinstance(values[0], torch.Tensor):
            if any(v.shape[1:] != values[0].shape[1:] for v in values):
                raise ValueError(f"{field.name} shapes differ")
            changes[field.name] = torch.cat(values, dim=0)
        elif any(v != values[0] for v in values):
            raise ValueError(f"{field.name} differs")
    return dataclasses.replace(first, **changes)


def merge_caches(caches: list[ZooCache]) -> ZooCache | None:
    """One cache holding the rows of every cache in order, or None when some state carries a
    per-batch length (attention, Hyena) that differs between the caches."""
    merged = ZooCache(len(caches[0]))
    try:
        for i in range(len(merged)):
            mixer = _merge_states([c.layers[i][0] for c in caches])
            ffn = _merge_states([c.layers[i][1] for c in caches])
            merged.layers[i] = (mixer, ffn)
    except ValueError:
        return None
    merged.seen_tokens = max(c.seen_tokens for c in caches)
    return merged


_MERGEABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def states_mergeable(model: ZooForCausalLM) -> bool:
    """Whether states after different prompt lengths concatenate along the batch: probed once
    per model by prefilling one- and two-token prompts and trying."""
    if model not in _MERGEABLE:
        device = model.device
        caches = []
        for length in (1, 2):
            cache = model.new_cache()
            decode_step(model, torch.zeros(1, length, dtype=torch.long, device=device), cache)
            caches.append(cache)
        _MERGEABLE[model] = merge_caches(caches) is not None
    return _MERGEABLE[model]


@dataclasses.dataclass
class Prefilled:
    logits: torch.Tensor  # (B, V): the distribution of each row's next token
    cache: ZooCache
    tails: list[list[int]]  # prompt tokens each row still has to feed (catch-up), often empty
    merged: bool


def prefill(model: ZooForCausalLM, prompts: list[list[int]]) -> Prefilled:
    """Run every prompt through the model in the parallel form (see the module docstring)."""
    device = model.device
    lengths = [len(p) for p in prompts]
    if len(set(lengths)) == 1:
        cache = model.new_cache()
        logits = decode_step(model, torch.tensor(prompts, device=device), cache)
        return Prefilled(logits, cache, [[] for _ in prompts], merged=False)

    if not states_mergeable(model):
        # Length-carrying states: prefill the common prefix together, feed the rest step by step.
        shortest = min(lengths)
        cache = model.new_cache()
        ids = torch.tensor([p[:shortest] for p in prompts], device=device)
        logits = decode_step(model, ids, cache)
        return Prefilled(logits, cache, [p[shortest:] for p in prompts], merged=False)

    groups: dict[int, list[int]] = {}
    for row, length in enumerate(lengths):
        groups.setdefault(length, []).append(row)
    order, caches, logits = [], [], []
    for rows in groups.values():
        cache = model.new_cache()
        ids = torch.tensor([prompts[r] for r in rows], device=device)
        logits.append(decode_step(model, ids, cache))
        caches.append(cache)
        order += rows
    merged = merge_caches(caches)
    if merged is None:
        raise RuntimeError("states_mergeable() said yes but the prefilled states do not merge")
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    inverse = inverse.to(device)
    return Prefilled(torch.cat(logits).index_select(0, inverse),
                     merged.index_select(inverse), [[] for _ in prompts], merged=True)
