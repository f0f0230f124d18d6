"""Recurrent generation over the state contract: prefill, decode one token at a time, stream.

    result = zoo.infer.generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=32, temperature=0.8)
    result.tokens        # generated ids per row (the stop token included when one was hit)
    result.stats         # prefill / decode tokens per second, state bytes per sequence

Read top to bottom, as gpt-fast lays it out: the lean model step (`decode_step`), the prefill
of a ragged batch (`prefill`), the decode loop (`decode_steps`, a generator that never reads a
value back to the host unless stopping needs it) and `generate` / `stream` around them.

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

import contextlib
import dataclasses
import time
import weakref
from collections.abc import Callable, Iterator, Sequence

import torch

from zoo.cache import CacheLayout, ZooCache
from zoo.layers import MixerState
from zoo.model import ZooForCausalLM

from . import native
from .sampling import SamplingConfig, choose_tokens

Prompts = Sequence[int] | Sequence[Sequence[int]] | torch.Tensor


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
# The model step


def decode_step(model: ZooForCausalLM, ids: torch.Tensor, cache: ZooCache) -> torch.Tensor:
    """Feed ids (B, T) through the states in `cache` (updated in place); the logits of the last
    position (B, V). No input validation: the hot path skips forward()'s host-side id check."""
    hidden, _, _ = model.model(ids, None, cache)
    return model.lm_head(hidden[:, -1])


def forward_logits(model: ZooForCausalLM, ids: torch.Tensor, cache: ZooCache) -> torch.Tensor:
    """Like decode_step, but the logits of every position (B, T, V): speculative verification."""
    hidden, _, _ = model.model(ids, None, cache)
    return model.lm_head(hidden)


class _CompiledSteps(dict):
    """A model's compiled steps, kept in its __dict__. They close over that model object, so a
    copy of the model (deepcopy, pickle) starts without them rather than running the
    original's weights."""

    def __deepcopy__(self, memo) -> _CompiledSteps:
        return _CompiledSteps()

    def __reduce__(self):
        return _CompiledSteps, ()


CompiledStep = Callable[
    [torch.Tensor, list[torch.Tensor], list[int]],
    tuple[torch.Tensor, list[torch.Tensor], list[int]],
]


def _skip_module_and_global_guards(entries) -> list[bool]:
    """A guard_filter_fn: keep every guard but those on nn.Modules and on globals."""
    off_modules = torch.compiler.skip_guard_on_all_nn_modules_unsafe(entries)
    off_globals = torch.compiler.skip_guard_on_globals_unsafe(entries)
    return [keep and also for keep, also in zip(off_modules, off_globals)]


def compiled_decode_step(
    model: ZooForCausalLM, layout: CacheLayout, greedy: bool = False
) -> CompiledStep:
    """`decode_step` under torch.compile, on a cache taken apart by `ZooCache.flatten`:

        logits, tensors, ints = step(ids, tensors, ints)

    With greedy=True the step returns the argmax tokens (B,) in place of the logits: greedy
    decoding then runs no op outside the graph (the argmax alone was 3 us a token).

    The step takes and returns the cache's tensors and integers, not its objects: dynamo
    then rebuilds no state objects after each step (a tenth of a tiny model's step, 1 ms of
    SmolLM2's). One compiled step per model, dtype, device and layout, kept on the model.

    On CUDA the step is compiled without CUDA graphs (see `_compile_options`); checked against
    eager decoding on an H200 for every tiny config (tests/infer/test_generate_cuda.py).

    On the CPU a tiny model's step is all fixed cost: one call per op. Inductor fuses the step's
    small ops into a few C++ kernels, and its decompose-mm pass turns one-row products (batch
    1, sides up to 2048) into reductions it fuses too, where each would be a BLAS call of a few
    microseconds. Shapes start static; the first step whose lengths differ (a KV cache, the
    token count) recompiles once with them dynamic. Attention reads its KV cache through the
    C++ decode kernel, an opaque op in the graph; where the PyTorch path stands in (float64, no
    compiler), one more compile comes when a KV cache passes 4096 tokens: inductor
    sums longer float32 reductions (the softmax over the cache) in cascaded blocks for
    precision, and guards the length on that side of 4096.
    """
    weight = next(model.parameters())
    # a .to() keeps the parameter objects (whose guards are skipped, below): compile anew
    key = (weight.dtype, weight.device, layout, greedy)
    steps = model.__dict__.setdefault("_zoo_compiled_decode_steps", _CompiledSteps())
    if key not in steps:
        on_cuda = weight.device.type == "cuda"

        def step(ids, tensors, ints):
            cache = layout.unflatten(tensors, ints)
            logits = decode_step(model, ids, cache)
            new_layout, tensors, ints = cache.flatten()
            if new_layout != layout:  # checked while tracing; costs nothing per step
                raise RuntimeError(f"a decode step changed the cache's layout: {new_layout}")
            if greedy:  # as choose_tokens picks greedily
                return logits.float().argmax(dim=-1), tensors, ints
            return logits, tensors, ints

        # dynamo keeps compiled graphs per code object: a code object of this model's own keeps
        # another model (whose module guards are skipped too) from running this one's graphs
        step.__code__ = step.__code__.replace(co_name=f"decode_step_{len(steps)}_{id(model):x}")
        # Guards on the model's modules are skipped: checking hundreds of parameters cost a
        # tenth of SmolLM2's step. Weights may change in place, and a new dtype or device
        # compiles anew (the key above); swapping modules needs a new model object. Guards on
        # globals (the functions and classes the layers call: torch's, einops', zoo's) go too,
        # another 8% of a tiny model's step: monkeypatching one of them after the step
        # compiled goes unnoticed.
        # The size asserts inductor puts before each kernel re-check what the guards on the
        # inputs checked already (and the parameters' layouts, which only module surgery
        # changes): 20% of a tiny model's compiled step.
        steps[key] = torch.compile(step, dynamic=None, options=_compile_options(on_cuda))
    return steps[key]


COMPILE_MODES = (False, True, "inductor", "native")


def fast_decode_step(model: ZooForCausalLM, layout: CacheLayout, greedy: bool, batch_size: int,
                     mode: bool | str = True) -> CompiledStep:
    """The step `generate(compile=mode)` runs. "native": zoo.infer.native's C++ step, one call
    per token (CPU; stacks of attention with SwiGLU or GELU FFNs and RMSNorm; at most 16 rows),
    an error where it does not apply; "inductor": `compiled_decode_step`; True: native where it
    applies, inductor otherwise."""
    if mode in (True, "native"):
        support = native.native_support(model, layout, batch_size)
        if support:
            return native.native_decode_step(model, layout, greedy)
        if mode == "native":
            raise ValueError(f"compile='native' does not apply to this model: {support.reason}")
    return compiled_decode_step(model, layout, greedy)


def _compile_options(on_cuda: bool) -> dict:
    """torch.compile's options for the decode step. No CUDA graphs on CUDA: the step's new
    states are its outputs and the next step's inputs, which a graph replay overwrites
    (cudagraph trees refused every bounded mixer on an H200), and attention's in-place KV
    writes make inductor skip the capture anyway."""
    options = {"guard_filter_fn": _skip_module_and_global_guards, "size_asserts": False}
    if not on_cuda:
        options["post_grad_fusion_options"] = {"decompose_mm_pass": {}}
    return options


@contextlib.contextmanager
def flushing_denormals(enabled: bool = True) -> Iterator[None]:
    """CPU floats below ~1e-38 read as zero inside the block (x86 FTZ/DAZ).

    A recurrent state decays old contributions geometrically, and after thousands of tokens
    some reach the denormal range, where x86 arithmetic is many times slower: Mamba-tiny's
    compiled step went from 0.063 to 0.083 ms/token after an 8k-token prompt. Values that small
    cannot change a token. The mode is per thread and torch has no getter for it: it is
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


# ---------------------------------------------------------------------------------------------
# Prompts and prefill


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
        device = model.lm_head.weight.device
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
    device = model.lm_head.weight.device
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
            else:
                logits = decode_step(model, tokens[:, None], cache)
    finally:
        if plan.compile:  # the caller's cache object holds the last states again
            final = layout.unflatten(tensors, ints)
            cache.layers, cache.seen_tokens = final.layers, final.seen_tokens


# ---------------------------------------------------------------------------------------------
# generate and stream


def _stop_tokens(model: ZooForCausalLM, stop_tokens, eos_token_id) -> list[int]:
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
    while generating, see `flushing_denormals`.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if not (isinstance(compile, bool) or compile in COMPILE_MODES[2:]):
        raise ValueError(f"compile={compile!r} is not one of {COMPILE_MODES}")
    sampling = SamplingConfig(temperature, top_k, top_p, repetition_penalty)
    rows = normalize_prompts(prompts, model.config.vocab_size)
    device = model.lm_head.weight.device
    stops = _stop_tokens(model, stop_tokens, eos_token_id)
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
    device = model.lm_head.weight.device
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
        state_bytes=start.cache.nbytes(),
        merged_prefill=start.merged,
    )
    return GenerationResult(rows, generated, reasons, stats, start.cache if return_cache else None)


def stream(model: ZooForCausalLM, prompts: Prompts, **kwargs) -> Stream:
    """`generate(..., stream=True)`: iterate for (row, token) pairs, then read `.result`."""
    return generate(model, prompts, stream=True, **kwargs)
