"""The model step every decoding path shares: ids through the states, logits out."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from zoo.cache import ZooCache
from zoo.model import ZooForCausalLM

from .state_quant import restore_cache, store_cache


def decode_step(model: ZooForCausalLM, ids: torch.Tensor, cache: ZooCache) -> torch.Tensor:
    """Feed ids (B, T) through the states in `cache` (updated in place); the logits of the last
    position (B, V). No input validation: the hot path skips forward()'s host-side id check."""
    hidden, _, _ = model.model(ids, None, cache)
    return model.lm_head(hidden[:, -1])


def decode_step_stored(
    model: ZooForCausalLM, ids: torch.Tensor, cache: ZooCache, state_dtype: str
) -> torch.Tensor:
    """decode_step with the bounded states stored as `state_dtype` between calls (see
    zoo.infer.state_quant): restored before the step reads them, stored again after it."""
    restore_cache(cache)
    logits = decode_step(model, ids, cache)
    store_cache(cache, state_dtype)
    return logits


def forward_logits(model: ZooForCausalLM, ids: torch.Tensor, cache: ZooCache) -> torch.Tensor:
    """Like decode_step, but the logits of every position (B, T, V): speculative verification."""
    hidden, _, _ = model.model(ids, None, cache)
    return model.lm_head(hidden)


@contextlib.contextmanager
def flushing_denormals(enabled: bool = True) -> Iterator[None]:
    """CPU floats below ~1e-38 read as zero inside the block (x86 FTZ/DAZ).

    A recurrent state decays old contributions geometrically, and after thousands of tokens
    some reach the denormal range, where x86 arithmetic is many times slower; values that
    small cannot change a token. The mode is per thread and torch has no getter for it: it is
    switched back off (torch's default) on exit.
    """
    if not enabled:
        yield
        return
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
