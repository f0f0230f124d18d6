"""Recurrent generation over the state contract: prefill, decode one token at a time, stream.

    result = zoo.infer.generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=32, temperature=0.8)
    result.tokens        # generated ids per row (the stop token included when one was hit)
    result.stats         # prefill / decode tokens per second, state bytes per sequence

Laid out as gpt-fast lays it out: the lean model step (`decode_step`, step.py), the prefill of
a ragged batch (`prefill`, prefill.py), the compiled and native steps (compiled.py), and here the
decode loop (`decode_steps`, a generator that never reads a value back to the host unless
stopping needs it) with `generate` / `stream` around it.

Ragged batches. Left padding feeds pad tokens into a recurrence and corrupts its state, so zoo
never pads a prompt. Rows are prefilled at their own lengths, grouped by length (each group in
the parallel form), and the groups' states are concatenated along the batch when every state
field allows it: bounded mixers (linear attention, RetNet, RWKV, Mamba, Linformer) hold states
whose shapes do not depend on the length. States that carry the length itself (attention's KV
cache, Hyena's history: one `length` for the whole batch) cannot be merged; for them the batch
prefills the common prefix (the shortest prompt) in parallel, and the longer rows feed the rest
of their prompt through the decode steps while the shorter rows already generate ("catch-up").
Every row sees exactly its own tokens either way, so a ragged batch generates what each prompt
generates alone. Rows that finish early (a stop token, their token budget) emit nothing more;
the batch keeps stepping them on a filler token until every row is done.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence

import torch

from zoo.cache import ZooCache
from zoo.model import ZooForCausalLM

from .compiled import (  # noqa: F401  (the compile machinery's names, also importable from here)
    COMPILE_MODES,
    CompiledStep,
    compiled_decode_step,
    fast_decode_step,
)
from .prefill import (  # noqa: F401  (the prefill's names, also importable from here)
    Prefilled,
    Prompts,
    merge_caches,
    normalize_prompts,
    prefill,
    states_mergeable,
)
from .sampling import SamplingConfig, choose_tokens
from .state_quant import check_state_dtype, restore_cache, store_cache, stored_nbytes
from .step import decode_step, decode_step_stored, flushing_denormals, forward_logits  # noqa: F401


@dataclasses.dataclass
class GenerationStats:
    """Timings and sizes of one generate call (seconds; state bytes per sequence)."""

    batch_size: int
    prompt_tokens: int
    generated_tokens: int
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    state_bytes: int
    merged_prefill: bool  # ragged rows prefilled at their own lengths and merged (else catch-up)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.generated_tokens / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def decode_ms_per_step(self) -> float:
        """Milliseconds per batched decode step (one token for every row)."""
        return 1e3 * self.decode_seconds / self.decode_steps if self.decode_steps else 0.0

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "decode_tokens_per_s": self.decode_tokens_per_s,
                "decode_ms_per_step": self.decode_ms_per_step}


@dataclasses.dataclass
class GenerationResult:
    prompts: list[list[int]]
    tokens: list[list[int]]  # generated ids per row, the stop token included when hit
    finish_reasons: list[str]  # "stop" or "length" per row
    stats: GenerationStats
    cache: ZooCache | None = None  # the states after the last decode step

    @property
    def sequences(self) -> list[list[int]]:
        return [p + t for p, t in zip(self.prompts, self.tokens)]


# ---------------------------------------------------------------------------------------------
# The decode loop


@dataclasses.dataclass
class DecodePlan:
    """Everything the loop needs, prepared once before the first step."""

    sampling: SamplingConfig
    max_new_tokens: int
    stop_tokens: torch.Tensor | None  # (S,) ids, or None
    filler: int  # what finished rows are fed
    generator: torch.Generator | None
    stop_check_interval: int
    compile: bool | str = False  # one of COMPILE_MODES
    flush_denormal: bool = False  # see flushing_denormals
    state_dtype: str | None = None  # bounded states stored between steps (state_quant.py)


def decode_steps(
    model: ZooForCausalLM, start: Prefilled, prompts: list[list[int]], plan: DecodePlan
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (tokens (B,), emitted (B,) bool) once per step; `tokens` is what each row was fed
    next, `emitted` marks the rows for which it is a generated token (not catch-up, not done).

    Nothing here reads a device value except the "all rows done?" check, made every
    `plan.stop_check_interval` steps and only when stop tokens can end rows early.
    """
    logits, cache, device = start.logits, start.cache, start.logits.device
    B = logits.shape[0]
    forced = torch.tensor([len(t) for t in start.tails], device=device)
    C = int(forced.max())
    total = C + plan.max_new_tokens
    cache.reserve(total)  # growing states (KV caches) allocate once, not during the loop
    if plan.state_dtype is not None:
        store_cache(cache, plan.state_dtype)
    fed = torch.full((B, total), plan.filler, dtype=torch.long, device=device)
    for row, tail in enumerate(start.tails):
        if tail:
            fed[row, : len(tail)] = torch.tensor(tail, device=device)
    last_step = forced + plan.max_new_tokens - 1  # the step of each row's last token
    seen = None
    if plan.sampling.repetition_penalty != 1.0:
        # every prompt token counts as seen (as in transformers); generated ones join below
        seen = torch.zeros(B, logits.shape[-1], dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            seen[row, torch.tensor(prompt, device=device)] = True
    ragged, stops = C > 0, plan.stop_tokens is not None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    everyone = torch.ones(B, dtype=torch.bool, device=device)
    # greedy without a repetition penalty: the compiled step picks the tokens itself
    picks_in_step = plan.compile and plan.sampling.greedy and seen is None
    picked = None
    if plan.compile:  # the compiled step carries the cache as plain tensors and ints
        layout, tensors, ints = cache.flatten()
        compiled = fast_decode_step(model, layout, picks_in_step, B, plan.compile)
    row_index = torch.arange(B, device=device)
    try:
        for s in range(total):
            # the first token comes from the prefill's logits
            tokens = picked if picked is not None else choose_tokens(
                logits, plan.sampling, plan.generator, seen)
            if ragged or stops:
                emitted = (forced <= s) & ~done
                tokens = torch.where(forced > s, fed[:, s], tokens)
                tokens = torch.where(done, plan.filler, tokens)
                finished = last_step <= s
                if stops:
                    finished = finished | torch.isin(tokens, plan.stop_tokens)
                done = done | (emitted & finished)
            else:
                emitted = everyone
            if seen is not None:
                seen[row_index, tokens] |= emitted
            yield tokens, emitted
            if s == total - 1:
                break
            if stops and (s + 1) % plan.stop_check_interval == 0 and bool(done.all()):
                break
            if picks_in_step:
                picked, tensors, ints = compiled(tokens[:, None], tensors, ints)
            elif plan.compile:
                logits, tensors, ints = compiled(tokens[:, None], tensors, ints)
            elif plan.state_dtype is not None:
                logits = decode_step_stored(model, tokens[:, None], cache, plan.state_dtype)
            else:
                logits = decode_step(model, tokens[:, None], cache)
    finally:
        if plan.state_dtype is not None:  # the caller's cache holds states its mixers read
            restore_cache(cache)
        if plan.compile:  # the caller's cache object holds the last states again
            final = layout.unflatten(tensors, ints)
            cache.layers, cache.seen_tokens = final.layers, final.seen_tokens


# ---------------------------------------------------------------------------------------------
# generate and stream


def resolve_stop_tokens(model: ZooForCausalLM, stop_tokens, eos_token_id) -> list[int]:
    if stop_tokens is None and eos_token_id is None:
        eos_token_id = model.config.eos_token_id  # transformers' default as well
    found: list[int] = []
    for value in (stop_tokens, eos_token_id):
        if value is None:
            continue
        found += [value] if isinstance(value, int) else list(value)
    vocab = model.config.vocab_size
    bad = [t for t in found if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"stop token {bad[0]} is outside the vocabulary [0, {vocab})")
    return found


def check_length_limit(model: ZooForCausalLM, prompt_tokens: int, max_new_tokens: int) -> None:
    """A ValueError before any token is made when the longest prompt plus max_new_tokens is
    past what a layer can take (Hyena's max_len), instead of one halfway through decoding."""
    limit = model.sequence_limit()
    if limit is not None and prompt_tokens + max_new_tokens > limit[0]:
        length, where = limit
        fix = (f"lower max_new_tokens to at most {length - prompt_tokens} or shorten the prompt"
               if prompt_tokens < length else
               f"shorten the prompt to at most {length - 1} tokens")
        raise ValueError(
            f"a prompt of {prompt_tokens} tokens + max_new_tokens={max_new_tokens} is "
            f"{prompt_tokens + max_new_tokens} tokens, past this model's limit of {length} "
            f"({where}); {fix}"
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stream:
    """Iterate to get (row, token_id) as each token is generated; `result` once exhausted.

    Streaming reads every step's tokens back to the host: that sync is what streaming is.
    """

    def __init__(self, run: Iterator[tuple[int, int]]):
        self._run = run
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[tuple[int, int]]:
        try:
            while True:
                yield next(self._run)
        except StopIteration as stop:
            self.result = stop.value


def generate(
    model: ZooForCausalLM,
    prompts: Prompts,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_tokens: int | Sequence[int] | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int | None = None,
    stream: bool = False,
    compile: bool | str = False,
    stop_check_interval: int | None = None,
    return_cache: bool = False,
    flush_denormal: bool | None = None,
    state_dtype: str | None = None,
) -> GenerationResult | Stream:
    """Generate up to `max_new_tokens` per prompt; prompts may have different lengths.

    temperature 0 is greedy; top_k, top_p, repetition_penalty as in transformers. Rows stop at
    any of `stop_tokens` / `eos_token_id` (default: the config's eos_token_id), which is kept
    as their last token. `seed` makes sampling reproducible (its own torch.Generator, global RNG
    untouched). `stream=True` returns a `Stream` of (row, token) pairs. `compile=True` runs a
    compiled decode step: on the CPU, for stacks of attention with SwiGLU or GELU FFNs and
    RMSNorm (Llama, SmolLM2), the native C++ step (`zoo.infer.native`, one call per token),
    otherwise torch.compile's (see `compiled_decode_step`: the first call for a model compiles
    it, and its stats count that time as decoding); "native" or "inductor" ask for one.
    `stop_check_interval`: steps between the host-side "all rows done?" checks (default 1 on
    CPU, 8 on CUDA, where each check is a sync; rows finish on time either way, only wasted
    steps differ). `flush_denormal` (default: on the CPU) treats floats below ~1e-38 as zero
    while generating, see `flushing_denormals`. `state_dtype` ("bfloat16" or "int8") keeps
    the bounded mixers' recurrent sums stored in that format between decode steps (see
    zoo.infer.state_quant; the stats' state_bytes are then the stored bytes); the eager step
    only.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if not (isinstance(compile, bool) or compile in COMPILE_MODES[2:]):
        raise ValueError(f"compile={compile!r} is not one of {COMPILE_MODES}")
    check_state_dtype(state_dtype)
    if state_dtype is not None and compile:
        raise ValueError(f"state_dtype={state_dtype!r} is stored between eager decode steps; "
                         f"the compiled step keeps its states inside its graph: use "
                         f"compile=False with it")
    sampling = SamplingConfig(temperature, top_k, top_p, repetition_penalty)
    rows = normalize_prompts(prompts, model.config.vocab_size)
    check_length_limit(model, max(map(len, rows)), max_new_tokens)
    device = model.device
    stops = resolve_stop_tokens(model, stop_tokens, eos_token_id)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    if stop_check_interval is None:
        stop_check_interval = 8 if device.type == "cuda" else 1
    plan = DecodePlan(
        sampling=sampling,
        max_new_tokens=max_new_tokens,
        stop_tokens=torch.tensor(stops, device=device) if stops else None,
        filler=stops[0] if stops else (model.config.pad_token_id or 0),
        generator=generator,
        stop_check_interval=max(1, stop_check_interval),
        compile=compile,
        flush_denormal=device.type == "cpu" if flush_denormal is None else flush_denormal,
        state_dtype=state_dtype,
    )
    run = _run(model, rows, plan, stream, return_cache)
    if stream:
        return Stream(run)
    try:
        while True:
            next(run)  # only a stream yields; this loop just drives the run
    except StopIteration as finished:
        return finished.value


def _run(model, rows, plan, stream, return_cache):
    """The generator behind generate(): yields (row, token) only when streaming, returns the
    GenerationResult."""
    device = model.device
    was_training = model.training
    model.eval()  # dropout, MoE jitter and capacity are training-only behaviours
    try:
        # no_grad, not inference_mode: a returned cache must stay usable for more decoding
        with torch.no_grad(), flushing_denormals(plan.flush_denormal):
            start_time = time.perf_counter()
            start = prefill(model, rows)
            _sync(device)
            prefill_seconds = time.perf_counter() - start_time
            decode_start, steps, history = time.perf_counter(), 0, []
            for tokens, emitted in decode_steps(model, start, rows, plan):
                steps += 1
                history.append((tokens, emitted))
                if stream:
                    for row, (token, out) in enumerate(zip(tokens.tolist(), emitted.tolist())):
                        if out:
                            yield row, token
            _sync(device)
            decode_seconds = time.perf_counter() - decode_start
    finally:
        model.train(was_training)
    # One host read for the whole run.
    tokens = torch.stack([t for t, _ in history], dim=1).tolist()
    emitted = torch.stack([e for _, e in history], dim=1).tolist()
    stop_set = set(plan.stop_tokens.tolist()) if plan.stop_tokens is not None else set()
    generated, reasons = [], []
    for row in range(len(rows)):
        out = [t for t, e in zip(tokens[row], emitted[row]) if e]
        generated.append(out)
        reasons.append("stop" if out and out[-1] in stop_set else "length")
    # The decode steps past the prefill fed (steps - 1) tokens; the first token came from prefill.
    stats = GenerationStats(
        batch_size=len(rows),
        prompt_tokens=sum(map(len, rows)),
        generated_tokens=sum(map(len, generated)),
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        decode_steps=max(steps - 1, 0),
        state_bytes=stored_nbytes(start.cache, plan.state_dtype),
        merged_prefill=start.merged,
    )
    return GenerationResult(rows, generated, reasons, stats, start.cache if return_cache else None)


def stream(model: ZooForCausalLM, prompts: Prompts, **kwargs) -> Stream:
    """`generate(..., stream=True)`: iterate for (row, token) pairs, then read `.result`."""
    return generate(model, prompts, stream=True, **kwargs)
