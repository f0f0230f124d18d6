"""The one decode timer every benchmark and report uses.

It times zoo.infer's own decode loop (`prefill`, then `decode_steps`: the path `generate` runs,
eager or compiled), not `model(token, cache=...)`, whose input check reads the ids back to the
host on every call. A figure is the median interval between consecutive decode steps, so the
prefill is never mixed in and one slow step on a shared machine does not move it. Beside
ms/token it gives what a step reads (the weights once, the state once) and the bandwidth that
achieves, against the machine's read bandwidth when asked to measure it (gpt-fast prints
bandwidth beside tokens/s for the same reason: it says how close a step is to its limit).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import statistics
import time
from collections.abc import Iterator

import torch

from zoo.infer.generate import DecodePlan, decode_steps, flushing_denormals, prefill
from zoo.infer.sampling import SamplingConfig
from zoo.layers.attention import AttentionState
from zoo.model import ZooForCausalLM

NEW_TOKENS = 24


@dataclasses.dataclass(frozen=True)
class DecodeTiming:
    """One decode measurement at `context` tokens, batch 1."""

    context: int
    ms_per_token: float  # median interval between consecutive steps
    min_ms_per_token: float
    state_bytes: int  # per sequence, after the prefill
    weight_bytes: int  # every parameter once (tied weights once)
    read_GB_per_s: float | None = None  # the machine's read bandwidth, measured just before

    @property
    def bytes_per_step(self) -> int:
        """What one step must read at least: every weight and the state, once each."""
        return self.weight_bytes + self.state_bytes

    @property
    def achieved_GB_per_s(self) -> float:
        return self.bytes_per_step / self.ms_per_token / 1e6

    @property
    def bound_ms(self) -> float | None:
        """Milliseconds to read bytes_per_step at the measured bandwidth."""
        if self.read_GB_per_s is None:
            return None
        return self.bytes_per_step / self.read_GB_per_s / 1e6

    @property
    def x_bound(self) -> float | None:
        return None if self.bound_ms is None else self.ms_per_token / self.bound_ms

    def row(self) -> dict:
        """The measurement as plain numbers, for a benchmark's rows."""
        return {"context": self.context, "ms_per_token": self.ms_per_token,
                "min_ms_per_token": self.min_ms_per_token, "state_bytes": self.state_bytes,
                "weight_bytes": self.weight_bytes, "achieved_GB_per_s": self.achieved_GB_per_s,
                "read_GB_per_s": self.read_GB_per_s, "x_bound": self.x_bound}

    def summary(self) -> str:
        """ms/token beside the bandwidth it achieves, as a person reads it."""
        text = (f"{self.ms_per_token:.3f} ms/token at {self.context:,} context, "
                f"{self.achieved_GB_per_s:.1f} GB/s")
        if self.read_GB_per_s is not None:
            text += f" of {self.read_GB_per_s:.1f} measured (x{self.x_bound:.2f} of the bound)"
        return text


@torch.no_grad()
def time_decode(
    model: ZooForCausalLM,
    prompt: torch.Tensor | int,
    new_tokens: int = NEW_TOKENS,
    *,
    compile: bool | str = False,
    measure_bandwidth: bool = False,
    real_prefill: int | None = None,
    seed: int = 0,
) -> DecodeTiming:
    """Time greedy decoding of `new_tokens` tokens after `prompt`.

    Args:
        prompt: (1, T) token ids, or a context length (random ids from `seed`).
        compile: as `zoo.infer.generate` takes it; warm a compiled step up first with a short
            call (its first steps compile).
        measure_bandwidth: read the machine's bandwidth just before timing (~0.5 s), so the
            figure can be set against the read bound in the same spell.
        real_prefill: prefill at most this many real tokens and grow attention KV caches to the
            context with random keys and values at the cache's scale: a step reads every cached
            entry whatever it holds, and a long real prefill of a large model takes minutes.
    """
    model.eval()
    device = model.device
    if isinstance(prompt, int):
        generator = torch.Generator().manual_seed(seed)
        real = prompt if real_prefill is None else min(prompt, real_prefill)
        ids = torch.randint(0, model.config.vocab_size, (1, real), generator=generator)
        context = prompt
    else:
        ids, context = prompt, prompt.shape[1]
    rows = ids.tolist()
    plan = DecodePlan(SamplingConfig(), new_tokens, None, 0, None, 1, compile=compile)
    bandwidth = read_bandwidth(device.type) if measure_bandwidth else None
    with flushing_denormals(device.type == "cpu"), without_gc():  # as generate() does
        start = prefill(model, rows)
        if context > len(rows[0]):
            _grow_attention_caches(start.cache, context, seed)
        state_bytes = start.cache.nbytes()  # the steps below grow a KV cache in place
        times = []
        for _ in decode_steps(model, start, rows, plan):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter())
    intervals = [b - a for a, b in zip(times, times[1:])]
    return DecodeTiming(
        context=context, ms_per_token=1e3 * statistics.median(intervals),
        min_ms_per_token=1e3 * min(intervals), state_bytes=state_bytes,
        weight_bytes=weight_bytes(model),
        read_GB_per_s=None if bandwidth is None else bandwidth / 1e9)


def _grow_attention_caches(cache, context: int, seed: int) -> None:
    """Extend every full (unwindowed) KV cache to `context` tokens with random entries."""
    generator = torch.Generator().manual_seed(seed + 1)
    for i, (state, ffn_state) in enumerate(cache.layers):
        if not isinstance(state, AttentionState) or state.window is not None:
            continue
        k, v = state.keys_values()  # (B, H_kv, L, D)
        extra = (k.shape[0], k.shape[1], context - k.shape[2], k.shape[3])
        grown = state.with_capacity(context)
        grown = grown.write(torch.randn(extra, generator=generator).to(k) * k.std(),
                            torch.randn(extra, generator=generator).to(v) * v.std())
        cache.layers[i] = (grown, ffn_state)
    cache.seen_tokens = context


@contextlib.contextmanager
def without_gc() -> Iterator[None]:
    """Python's cyclic collector off while a figure is timed, as timeit does: a collection walks
    every object transformers and the compiled graphs created, at moments that differ from one
    figure to the next."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def read_bandwidth(device: str, nbytes: int = 512 * 2**20, repeats: int = 7) -> float:
    """Bytes per second of reading a large fp32 tensor once (a sum), best of `repeats`: the
    bandwidth a decode step that reads every weight once is bound by."""
    x = torch.ones(nbytes // 4, device=device)
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        x.sum().item()
        times.append(time.perf_counter() - t)
    return nbytes / min(times)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters a decode step reads (tied weights once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total
