"""Continuous batching: requests join and leave a running batch at any step.

    engine = Engine(model, max_batch=16)
    rid = engine.add(Request(prompt=[1, 2, 3], max_new_tokens=32, stop_token_ids=(eos,)))
    while engine.has_work():
        for event in engine.step():      # TokenEvent(request_id, token, finish_reason)
            ...

Every layer's state goes to the store that fits it, found once by running the model on one and
on two tokens:
- a state of fixed shape with no length or position in it (Mamba, RWKV, the delta rules, RWKV's
  channel mixing) lives in a pool of `max_batch` slots allocated once; a request takes a free
  slot, and a step gathers the running rows' slots, runs the mixer's own decode and writes the
  rows back. So does a fixed-shape state whose one position (for its rotation) the mixer also
  takes per row, as the padding contract's `next_positions` (RetNet, linear attention, LoLCATs'
  window + linear attention): the engine hands each row its own;
- softmax attention's KV cache lives in blocks of `block_size` tokens (zoo.infer.paged, vLLM's
  PagedAttention layout): a request holds a block table, decoding reads keys and values from the
  blocks (`Attention.forward_paged`), and a finished request's blocks go back at once. A
  request takes, when admitted, the blocks its prompt and max_new_tokens can fill, so a running
  request never runs short and nothing is ever preempted; one that stops early frees the rest;
- a state carrying a length as one integer for its batch (Hyena's history, MLA's latent cache)
  cannot hold rows at different lengths, so each request keeps its own, and that one layer runs
  row by row; every other layer of the step stays batched.
A step decodes every running request in one batched forward (the weights read once for all
rows), then prefills waiting prompts, at most `prefill_chunk` prompt tokens per step, so a long
prompt never stalls the running streams for long. Each request samples with its own settings and
its own torch.Generator: its tokens do not depend on who else is in the batch, and with a seed
they are the tokens `zoo.infer.generate` gives that prompt alone.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import operator
import time
from collections.abc import Callable, Sequence

import torch

from zoo.compression import prepare_kernels
from zoo.layers import MixerState
from zoo.layers.attention import Attention, AttentionState
from zoo.model import ZooForCausalLM

from .generate import check_length_limit
from .paged import KVBlockPool
from .sampling import SamplingConfig, process_logits
from .step import flushing_denormals

FINISH_REASONS = ("stop", "length", "cancelled")
# tokens of KV cache per slot the block pool holds when kv_blocks is not given
DEFAULT_KV_TOKENS_PER_SLOT = 1024


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request. temperature 0 is greedy; top_k 0 and top_p 1.0 mean off;
    repetition_penalty 1.0 means off; `seed` seeds the request's own generator (None: a fresh
    random seed); generation stops after any of `stop_token_ids` (kept as the last token) or
    after `max_new_tokens`."""

    prompt: Sequence[int]
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()

    def __post_init__(self):
        object.__setattr__(self, "prompt", _token_ids(self.prompt, "prompt"))
        object.__setattr__(self, "stop_token_ids",
                           _token_ids(self.stop_token_ids, "stop_token_ids"))
        if not self.prompt:
            raise ValueError("prompt is empty: a request needs at least one token")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 1")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0 (0 means off)")
        if self.seed is not None and (isinstance(self.seed, bool)
                                      or not isinstance(self.seed, int)):
            raise ValueError(f"seed={self.seed!r} must be an integer or None")
        self.sampling()  # temperature, top_p and repetition_penalty, each error naming its field

    def sampling(self) -> SamplingConfig:
        """These settings as zoo.infer's SamplingConfig (what generate() takes)."""
        return SamplingConfig(
            temperature=self.temperature,
            top_k=self.top_k or None,
            top_p=None if self.top_p == 1.0 else self.top_p,
            repetition_penalty=self.repetition_penalty,
        )


def _token_ids(values: Sequence[int], field: str) -> tuple[int, ...]:
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    try:
        return tuple(operator.index(v) for v in values)
    except TypeError:
        raise ValueError(f"{field} must be a sequence of integer token ids, got "
                         f"{type(values).__name__} {values!r:.60}") from None


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """A token generated for a request (`finish_reason` set on its last one), or, with token
    None, the notice that the request was cancelled."""

    request_id: int
    token: int | None
    finish_reason: str | None = None  # None, "stop", "length" or "cancelled"


# Where a layer's state lives (see the module docstring).
_STATELESS, _SLOTS, _PAGED, _PER_REQUEST = "stateless", "slots", "paged", "per_request"
_POSITIONED_SLOTS = "positioned_slots"  # slots, and the engine hands each row its position


@dataclasses.dataclass
class _SlotPool:
    """One layer's fixed-shape state for `max_batch` rows: a state from the probe (its non-tensor
    fields) and one (max_batch, ...) tensor per tensor field.

    `positioned`: the state counts tokens in `position`, one integer for its batch, and takes
    per-row counts in `next_positions` (B,) long, as after padding (RetNet, linear attention,
    LoLCATs' window + linear attention). The engine knows each row's count and hands it over:
    one row (a prefill chunk) as `position`, a decode batch as `next_positions`."""

    template: MixerState
    tensors: dict[str, torch.Tensor]
    positioned: bool = False

    def gather(self, slots: torch.Tensor, positions: torch.Tensor | int,
               span: slice | None = None) -> MixerState:
        """The rows' state. `span`: the rows' slots as one range of the pool, in order; the
        state's tensors are then views of the pool, no copy, which a step writing its state in
        place updates where it lives."""
        if span is not None:
            changes = {name: t[span] for name, t in self.tensors.items()}
        else:
            changes = {name: t.index_select(0, slots) for name, t in self.tensors.items()}
        if self.positioned:
            per_row = isinstance(positions, torch.Tensor)
            changes.update(position=0 if per_row else positions,
                           next_positions=positions if per_row else None)
        return dataclasses.replace(self.template, **changes)

    def scatter(self, slots: torch.Tensor, state: MixerState, span: slice | None = None) -> None:
        for name, t in self.tensors.items():
            new = getattr(state, name)
            if span is None:
                t.index_copy_(0, slots, new)
            elif new.data_ptr() != t[span].data_ptr():  # not the pool's own rows, updated
                t[span].copy_(new)


@dataclasses.dataclass(eq=False)
class _Sequence:
    """An admitted request: its slot, its KV blocks, and how far it has got."""

    request_id: int
    request: Request
    sampling: SamplingConfig
    slot: int
    blocks: list[int]
    generator: torch.Generator
    seen: torch.Tensor | None  # (V,) bool: prompt and generated ids, for the repetition penalty
    prompt_fed: int = 0  # prompt tokens prefilled so far
    cached: int = 0  # tokens in the states (the next fed token's position)
    pending: int | None = None  # the token the next decode step feeds
    generated: int = 0
    own_states: dict = dataclasses.field(default_factory=dict)  # (layer, which) -> state

    @property
    def decoding(self) -> bool:
        return self.pending is not None


class Engine:
    """A running batch of requests over one model (see the module docstring).

    max_batch: requests running at once (the slots of the bounded-state pool). block_size:
    tokens per KV block. kv_blocks: blocks in the pool of every attention layer (default: room
    for max_batch sequences of 1024 tokens, or of the model's length limit when lower).
    prefill_chunk: prompt tokens prefilled per step at most. native: decode steps through zoo's
    C++ step (zoo.infer.native) over the KV blocks, all rows in one call: True (an error naming
    why where the model cannot), False, or "auto" (where it can: attention-only stacks with
    RMSNorm and SwiGLU/MLP FFNs, float KV, on the CPU; not with compile=True). compile: decode
    steps through torch.compile, the batch padded to a bucket (1, 2, 4, ... max_batch), each
    bucket compiled when first reached or all by `warm_up()`; paged attention and per-request
    layers stay eager between the compiled segments. Off by default: it does not win for every
    family (Mamba-2's eager in-place step is faster at 16 rows).
    The engine puts the model in eval mode. Not thread-safe: one thread calls add, cancel and
    step (zoo serve's engine thread).
    """

    def __init__(self, model: ZooForCausalLM, max_batch: int = 16, block_size: int = 16,
                 kv_blocks: int | None = None, prefill_chunk: int = 64, compile: bool = False,
                 native: bool | str = "auto"):
        for name, value in (("max_batch", max_batch), ("block_size", block_size),
                            ("prefill_chunk", prefill_chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if kv_blocks is not None and (isinstance(kv_blocks, bool)
                                      or not isinstance(kv_blocks, int) or kv_blocks < 1):
            raise ValueError(f"kv_blocks={kv_blocks!r} must be an integer >= 1 or None")
        if not isinstance(compile, bool):
            raise ValueError(f"compile={compile!r} must be True or False")
        self.model = model.eval()
        self.device = model.device
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.vocab_size = model.config.vocab_size
        with torch.inference_mode():
            # a compiled step's padding rows read and write one spare slot past the last
            self._plan(block_size, kv_blocks, spare_rows=int(compile))
        # an explicit compile=True keeps its compiled step where native is left on "auto"
        self._native_step = self._native_decoder(False if compile and native == "auto"
                                                 else native)
        self._free_slots = list(range(max_batch - 1, -1, -1))
        self._waiting: collections.deque[tuple[int, Request]] = collections.deque()
        self._active: dict[int, _Sequence] = {}  # admission order
        self._events: list[TokenEvent] = []  # cancellations, reported by the next step
        self._ids = itertools.count()
        self.compile_seconds = 0.0  # spent compiling by warm_up()
        self._compiled_step = self._compile_decode_step() if compile else None

    # -- setup ---------------------------------------------------------------------------------

    def _plan(self, block_size: int, kv_blocks: int | None, spare_rows: int = 0) -> None:
        """Probe every layer's state on one and on two tokens, and give each the store that
        fits it: slots, KV blocks, or the request's own."""
        probes = []
        for length in (1, 2):
            cache = self.model.new_cache()
            self.model.model(torch.zeros(1, length, dtype=torch.long, device=self.device),
                             None, cache)
            probes.append(cache)
        self._kinds: list[tuple[str, str]] = []
        self._slot_pools: dict[tuple[int, str], _SlotPool] = {}
        kv_shapes, kv_dtype = {}, None
        for i, block in enumerate(self.model.model.layers):
            kinds = []
            for which, module, one, two in zip(("mixer", "ffn"), (block.mixer, block.ffn),
                                               probes[0].layers[i], probes[1].layers[i]):
                kind = _store_for(module, one, two)
                if kind == _PER_REQUEST and getattr(module, "takes_forward_context", False):
                    raise ValueError(
                        f"layer {i}'s {which} ({type(module).__name__}) takes the forward context "
                        "and carries a length in its state: the engine cannot batch it")
                if kind in (_SLOTS, _POSITIONED_SLOTS):
                    self._slot_pools[i, which] = _SlotPool(one, {
                        f.name: torch.zeros((self.max_batch + spare_rows, *value.shape[1:]),
                                            dtype=value.dtype, device=value.device)
                        for f in dataclasses.fields(one)
                        if isinstance(value := getattr(one, f.name), torch.Tensor)},
                        positioned=kind == _POSITIONED_SLOTS)
                    kind = _SLOTS
                if kind == _PAGED:
                    kv_shapes[i] = (module.n_kv_heads, module.head_dim)
                    kv_dtype = one.v.dtype
                kinds.append(kind)
            self._kinds.append(tuple(kinds))
        limit = self.model.sequence_limit()
        per_slot = DEFAULT_KV_TOKENS_PER_SLOT if limit is None else min(
            DEFAULT_KV_TOKENS_PER_SLOT, limit[0])
        if kv_blocks is None:
            kv_blocks = self.max_batch * -(-per_slot // block_size) if kv_shapes else 0
        self.kv = KVBlockPool(kv_shapes, kv_blocks if kv_shapes else 0, block_size,
                              kv_dtype or torch.float32, self.device)
        # each slot's block table, so a step gathers the running rows' tables in one call
        self._block_tables = torch.zeros(self.max_batch, max(self.kv.num_blocks, 1),
                                         dtype=torch.long, device=self.device)
        self._state_bytes = sum(pool.template.nbytes() for pool in self._slot_pools.values())

    # -- the public interface ------------------------------------------------------------------

    def add(self, request: Request) -> int:
        """Queue `request` (it starts when a slot and its KV blocks are free); its id."""
        if not isinstance(request, Request):
            raise TypeError(f"request must be a zoo.infer.engine.Request, got "
                            f"{type(request).__name__}")
        for field in ("prompt", "stop_token_ids"):
            bad = [t for t in getattr(request, field) if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"{field} contains token id {bad[0]}, outside the vocabulary "
                                 f"[0, {self.vocab_size}) (config.vocab_size={self.vocab_size})")
        check_length_limit(self.model, len(request.prompt), request.max_new_tokens)
        need = self._blocks_needed(request)
        if need > self.kv.num_blocks:
            raise ValueError(
                f"a prompt of {len(request.prompt)} tokens + max_new_tokens="
                f"{request.max_new_tokens} needs {need} KV blocks of {self.kv.block_size} "
                f"tokens, more than the engine's kv_blocks={self.kv.num_blocks}; lower "
                "max_new_tokens, shorten the prompt or give the engine more kv_blocks")
        request_id = next(self._ids)
        self._waiting.append((request_id, request))
        return request_id

    def cancel(self, request_id: int) -> None:
        """Stop a request now: its slot and KV blocks are free at once, and the next step
        reports TokenEvent(request_id, None, "cancelled"). An unknown or finished id: no-op."""
        for entry in self._waiting:
            if entry[0] == request_id:
                self._waiting.remove(entry)
                self._events.append(TokenEvent(request_id, None, "cancelled"))
                return
        sequence = self._active.get(request_id)
        if sequence is not None:
            self._release(sequence)
            self._events.append(TokenEvent(request_id, None, "cancelled"))

    def has_work(self) -> bool:
        return bool(self._waiting or self._active or self._events)

    def step(self) -> list[TokenEvent]:
        """One iteration: admit what fits, one batched decode step over the running requests,
        then up to `prefill_chunk` prompt tokens of the admitted ones still prefilling."""
        events, self._events = self._events, []
        with torch.inference_mode(), flushing_denormals(self.device.type == "cpu"):
            self._admit()
            events += self._decode()
            events += self._prefill()
        return events

    def stats(self) -> dict:
        """Counts of requests, slots and KV blocks, and the bytes of state they hold."""
        decoding = sum(s.decoding for s in self._active.values())
        bytes_per_token = self.kv.bytes_per_token()
        return {
            "active": len(self._active),
            "decoding": decoding,
            "prefilling": len(self._active) - decoding,
            "waiting": len(self._waiting),
            "max_batch": self.max_batch,
            "free_slots": len(self._free_slots),
            "block_size": self.kv.block_size,
            "kv_blocks_total": self.kv.num_blocks,
            "kv_blocks_free": self.kv.free_blocks,
            "kv_blocks_used": self.kv.used_blocks,
            "kv_bytes_per_token": bytes_per_token,
            "kv_bytes_in_use": bytes_per_token * sum(s.cached for s in self._active.values()),
            "kv_bytes_reserved": bytes_per_token * self.kv.block_size * self.kv.used_blocks,
            "state_bytes_per_sequence": self._state_bytes,
            # the states a request keeps itself (Hyena's history, MLA's cache), which grow
            "own_state_bytes_in_use": sum(state.nbytes() for s in self._active.values()
                                          for state in s.own_states.values()),
        }

    # -- admission and release -----------------------------------------------------------------

    def _blocks_needed(self, request: Request) -> int:
        """KV blocks for the prompt and every generated token but the last (never fed)."""
        if not self.kv.keys:
            return 0
        return self.kv.blocks_for(len(request.prompt) + request.max_new_tokens - 1)

    def _admit(self) -> None:
        """Waiting requests take free slots and their blocks, first come first served: the
        head of the queue waits for room rather than being overtaken."""
        while self._waiting and self._free_slots:
            request_id, request = self._waiting[0]
            need = self._blocks_needed(request)
            if need > self.kv.free_blocks:
                return
            self._waiting.popleft()
            slot, blocks = self._free_slots.pop(), self.kv.allocate(need)
            if blocks:
                # past its own blocks a row's table repeats its first: a decode step reads (and
                # masks) table entries up to the longest row's, which then never name another
                # request's block or one never handed out (uninitialised memory)
                self._block_tables[slot] = blocks[0]
                self._block_tables[slot, : len(blocks)] = torch.tensor(blocks)
            sampling = request.sampling()
            generator = torch.Generator(device=self.device)
            if request.seed is None:
                generator.seed()
            else:
                generator.manual_seed(request.seed)
            seen = None
            if sampling.repetition_penalty != 1.0:
                seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
                seen[torch.tensor(request.prompt, device=self.device)] = True
            self._active[request_id] = _Sequence(request_id, request, sampling, slot, blocks,
                                                 generator, seen)

    def _release(self, sequence: _Sequence) -> None:
        del self._active[sequence.request_id]
        self.kv.release(sequence.blocks)
        self._free_slots.append(sequence.slot)
        sequence.blocks, sequence.own_states = [], {}

    # -- decoding and prefilling ---------------------------------------------------------------

    def _decode(self) -> list[TokenEvent]:
        rows = [s for s in self._active.values() if s.decoding]
        if not rows:
            return []
        ids = torch.tensor([[s.pending] for s in rows], device=self.device)
        slots = torch.tensor([s.slot for s in rows], device=self.device)
        positions = torch.tensor([s.cached for s in rows], device=self.device)
        width = self.kv.blocks_for(max(s.cached for s in rows) + 1)
        tables = self._block_tables.index_select(0, slots)[:, :width]
        if self._native_step is not None:
            logits = self._native_step(ids[:, 0], self._native_kv, tables, positions)
        else:
            logits = self._forward(ids, rows, slots, (positions, tables))
        for s in rows:
            s.cached += 1
        return self._emit(rows, self._choose(logits, rows))

    def _native_decoder(self, native: bool | str) -> Callable | None:
        """The native step over the KV blocks where `native` asks for it and the model takes
        it (keeping its pool list in `_native_kv`), else None; native=True and a model it
        cannot run: a ValueError naming why."""
        if native is not True and native is not False and native != "auto":
            raise ValueError(f"native={native!r} must be True, False or 'auto'")
        if native is False:
            return None
        from . import native as native_step

        support = native_step.paged_native_support(self.model, self.kv.dtype)
        if not support:
            if native is True:
                raise ValueError(f"native=True: the native step cannot run this model: "
                                 f"{support.reason}")
            return None
        self._native_kv = [t for layer in sorted(self.kv.keys)
                           for t in (self.kv.keys[layer], self.kv.values[layer])]
        return native_step.native_paged_step(self.model)

    def _prefill(self) -> list[TokenEvent]:
        events, budget = [], self.prefill_chunk
        for s in [s for s in self._active.values() if not s.decoding]:
            if budget == 0:
                break
            prompt = s.request.prompt
            take = min(budget, len(prompt) - s.prompt_fed)
            chunk = torch.tensor([prompt[s.prompt_fed: s.prompt_fed + take]], device=self.device)
            slots = torch.tensor([s.slot], device=self.device)
            logits = self._forward(chunk, [s], slots, None)
            s.prompt_fed += take
            s.cached += take
            budget -= take
            if s.prompt_fed == len(prompt):
                events += self._emit([s], self._choose(logits, [s]))
        return events

    def _emit(self, rows: list[_Sequence], tokens: list[int]) -> list[TokenEvent]:
        events = []
        for s, token in zip(rows, tokens):
            s.generated += 1
            if s.seen is not None:
                s.seen[token] = True
            reason = None
            if token in s.request.stop_token_ids:
                reason = "stop"
            elif s.generated >= s.request.max_new_tokens:
                reason = "length"
            events.append(TokenEvent(s.request_id, token, reason))
            if reason is None:
                s.pending = token
            else:
                self._release(s)
        return events

    def _choose(self, logits: torch.Tensor, rows: list[_Sequence]) -> list[int]:
        """Each row's next token under its own settings: rows sharing settings are processed
        together, and each sampled row draws its noise from its own generator (the draw
        zoo.infer.sampling.sample_from_probs makes for a batch of one)."""
        if all(s.sampling.greedy and s.seen is None for s in rows):
            return logits.argmax(dim=-1).tolist()
        groups: dict[SamplingConfig, list[int]] = {}
        for row, s in enumerate(rows):
            groups.setdefault(s.sampling, []).append(row)
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        for config, members in groups.items():
            index = torch.tensor(members, device=logits.device)
            seen = None
            if config.repetition_penalty != 1.0:
                seen = torch.stack([rows[r].seen for r in members])
            processed = process_logits(logits.index_select(0, index), config, seen)
            if config.greedy:
                tokens[index] = processed.argmax(dim=-1)
                continue
            probs = processed.softmax(dim=-1)
            noise = torch.empty_like(probs)
            for j, r in enumerate(members):
                noise[j].exponential_(1.0, generator=rows[r].generator)
            tokens[index] = (probs / noise.clamp_min(torch.finfo(noise.dtype).tiny)).argmax(-1)
        return tokens.tolist()

    # -- the model, layer by layer -------------------------------------------------------------

    def _forward(self, ids: torch.Tensor, rows: list[_Sequence], slots: torch.Tensor,
                 paged: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """ZooModel's forward over the engine's stores: ids (B, T) -> the last position's logits
        (B, V). `paged` is (positions, block tables) for a decode step (T = 1), None for a
        prefill chunk (one row)."""
        if paged is not None and self._compiled_step is not None:
            return self._compiled_forward(ids, rows, slots, paged)
        order, span = _slot_order([s.slot for s in rows])
        if order is not None:  # rows taken in slot order, so their states are one pool range
            rows = [rows[i] for i in order]
            index = torch.tensor(order, device=ids.device)
            ids, slots = ids.index_select(0, index), slots.index_select(0, index)
            if paged is not None:
                paged = (paged[0].index_select(0, index), paged[1].index_select(0, index))
            logits = self._forward(ids, rows, slots, paged)
            return logits.index_select(0, torch.argsort(index))
        core = self.model.model
        x = core.embed_tokens(ids)
        if core.embed_norm is not None:
            x = core.embed_norm(x)
        context: dict[str, torch.Tensor] = {}
        # each row's tokens so far: per row in a decode step, one integer for a prefill's row
        positions = paged[0] if paged is not None else rows[0].cached
        for i, block in enumerate(core.layers):
            mixer_kind, ffn_kind = self._kinds[i]
            h = block.mixer_norm(x)
            if mixer_kind == _PAGED:
                h = self._attention(i, block.mixer, h, rows, paged)
            else:
                h = self._stateful(i, "mixer", mixer_kind, block.mixer, h, rows, slots,
                                   positions, context, span)
            x = x + h
            if block.ffn is not None:
                h = self._stateful(i, "ffn", ffn_kind, block.ffn, block.ffn_norm(x), rows, slots,
                                   positions, None, span)
                x = x + h
        return self.model.lm_head(core.norm(x[:, -1:])[:, 0])

    def _stateful(self, layer: int, which: str, kind: str, module: torch.nn.Module,
                  h: torch.Tensor, rows: list[_Sequence], slots: torch.Tensor,
                  positions: torch.Tensor | int, context: dict | None,
                  span: slice | None = None) -> torch.Tensor:
        extra = {"context": context} if getattr(module, "takes_forward_context", False) else {}
        if kind == _STATELESS:
            return module(h, None, **extra)[0]
        if kind == _SLOTS:
            pool = self._slot_pools[layer, which]
            # a request's first chunk starts from None, as generate's prefill does
            state = None if rows[0].cached == 0 else pool.gather(slots, positions, span)
            step_in_place = getattr(module, "step_in_place", None)
            if state is not None and h.shape[1] == 1 and step_in_place is not None:
                y = step_in_place(h, state)
            else:
                y, state = module(h, state, **extra)
            pool.scatter(slots, state, span)
            return y
        outputs = []
        for row, s in enumerate(rows):
            y, s.own_states[layer, which] = module(h[row: row + 1],
                                                   s.own_states.get((layer, which)))
            outputs.append(y)
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def _attention(self, layer: int, mixer: Attention, h: torch.Tensor, rows: list[_Sequence],
                   paged: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        keys, values = self.kv.keys[layer], self.kv.values[layer]
        if paged is not None:
            positions, tables = paged
            return mixer.forward_paged(h, positions, keys, values, tables)
        # a prefill chunk: the mixer's own forward over the row's cached keys read from the
        # blocks, then the chunk's new keys written back
        s, T = rows[0], h.shape[1]
        past = s.cached
        blocks = self._block_tables[s.slot]
        state = mixer.init_state(1, h.device, keys.dtype, capacity=past + T)
        if past:
            k, v = self.kv.read(layer, self.kv.slots(blocks, 0, past))
            state.k_t[0, :, :, :past] = k.permute(1, 2, 0)
            state.v[0, :, :past] = v.transpose(0, 1)
            state = dataclasses.replace(state, length=past, position=past)
        y, state = mixer(h, state)
        self.kv.write(layer, self.kv.slots(blocks, past, T),
                      state.k_t[0, :, :, past: past + T].permute(2, 0, 1),
                      state.v[0, :, past: past + T].transpose(0, 1))
        return y

    # -- the compiled decode step --------------------------------------------------------------

    def warm_up(self) -> float:
        """Compile the decode step for every batch bucket now, not when a batch first reaches
        it; the seconds spent (also kept as `compile_seconds`). A no-op without compile=True."""
        if self._compiled_step is None:
            return 0.0
        start = time.perf_counter()
        with torch.inference_mode(), flushing_denormals(self.device.type == "cpu"):
            for bucket in self._buckets:
                # no real row: every row is padding, on the spare slot, with no eager layer's work
                none = torch.zeros(0, dtype=torch.long, device=self.device)
                self._compiled_forward(none[:, None], [], none, (none, none), bucket)
        self.compile_seconds = time.perf_counter() - start
        return self.compile_seconds

    def _compile_decode_step(self) -> list:
        """The decode forward of `_forward` under torch.compile, over a batch padded to a bucket
        (1, 2, 4, ... max_batch: one graph each, so rows joining and leaving within a bucket
        recompile nothing). The slot layers gather, update and scatter their rows' states inside
        the graph, where inductor fuses the three; padding rows use the spare slot. The layers
        whose state is not in slots run eager between compiled segments, on the real rows only:
        attention over the KV blocks (its table width changes every block_size tokens) and the
        per-request states (Hyena's, MLA's, which grow). The step: a list of pieces, each a
        compiled segment (layers in slots and stateless ones) or one eager layer."""
        from .compiled import _compile_options

        weight = next(self.model.parameters())
        prepare_kernels(self.model, weight.dtype)  # quantised layers repack now, not in a step
        buckets = sorted({1 << i for i in range(self.max_batch.bit_length())
                          if 1 << i < self.max_batch} | {self.max_batch})
        # each bucket is a recompilation of every segment: past dynamo's limit, the largest
        self._buckets = buckets[-torch._dynamo.config.recompile_limit:]
        options = _compile_options(self.device.type == "cuda")
        core, pieces, units = self.model.model, [], []
        for i, block in enumerate(core.layers):
            for which, module, norm, kind in (
                    ("mixer", block.mixer, block.mixer_norm, self._kinds[i][0]),
                    ("ffn", block.ffn, block.ffn_norm, self._kinds[i][1])):
                if module is None:
                    continue
                if kind in (_PAGED, _PER_REQUEST):
                    pieces.append(("graph", self._compiled_segment(
                        units, not pieces, False, len(pieces), options)))
                    pieces.append(("eager", (i, which, kind, module, norm)))
                    units = []
                else:
                    units.append((i, which, kind, module, norm))
        pieces.append(("graph", self._compiled_segment(units, not pieces, True, len(pieces),
                                                        options)))
        return pieces

    def _compiled_segment(self, units: list[tuple], first: bool, last: bool, number: int,
                          options: dict) -> Callable:
        """One compiled segment of the decode step: (x, slots, positions, pool_tensors,
        context) -> x after `units`, each (layer, which, kind, module, norm); the first takes
        token ids (B, 1) for x, the last returns the logits (B, V)."""
        core, lm_head = self.model.model, self.model.lm_head
        pools, first_tensor = {}, 0  # each pool's fields and where its tensors start in the list
        for key, pool in self._slot_pools.items():
            pools[key] = (pool.template, first_tensor, list(pool.tensors), pool.positioned)
            first_tensor += len(pool.tensors)

        def segment(x, slots, positions, pool_tensors, context):
            if first:
                x = core.embed_tokens(x)
                if core.embed_norm is not None:
                    x = core.embed_norm(x)
            for layer, which, kind, module, norm in units:
                h = norm(x)
                extra = ({"context": context if which == "mixer" else None}
                         if getattr(module, "takes_forward_context", False) else {})
                if kind == _STATELESS:
                    x = x + module(h, None, **extra)[0]
                    continue
                template, start, names, positioned = pools[layer, which]
                tensors = {name: pool_tensors[start + j] for j, name in enumerate(names)}
                changes = {name: t.index_select(0, slots) for name, t in tensors.items()}
                if positioned:
                    changes.update(position=0, next_positions=positions)
                # the mixer's own step, Mamba-2's too: inductor fuses it better than the in-place
                # step, whose state written in place would cost the graph one more copy
                y, state = module(h, dataclasses.replace(template, **changes), **extra)
                for name, t in tensors.items():
                    t.index_copy_(0, slots, getattr(state, name))
                x = x + y
            if last:
                return lm_head(core.norm(x)[:, 0])
            return x

        # dynamo keeps graphs per code object: this engine's own keeps another engine's model
        # (module guards are skipped) from running this one's graphs
        segment.__code__ = segment.__code__.replace(
            co_name=f"engine_decode_segment_{number}_{id(self):x}")
        # dynamic=False: one static graph per bucket, never a dynamic one for all
        return torch.compile(segment, dynamic=False, options=options)

    def _compiled_forward(self, ids: torch.Tensor, rows: list[_Sequence], slots: torch.Tensor,
                          paged: tuple[torch.Tensor, torch.Tensor],
                          bucket: int | None = None) -> torch.Tensor:
        """`_forward` of a decode step through the compiled step: the rows padded to their
        bucket (the smallest that holds them unless given), the padding's logits dropped."""
        n = len(rows)
        if bucket is None:
            bucket = next(b for b in self._buckets if b >= n)
        padding = bucket - n
        positions = paged[0]
        if padding:
            spare = torch.full((padding,), self.max_batch, dtype=slots.dtype, device=slots.device)
            ids = torch.cat([ids, ids.new_zeros(padding, 1)])
            slots = torch.cat([slots, spare])
            positions = torch.cat([positions, positions.new_zeros(padding)])
        pool_tensors = [t for pool in self._slot_pools.values() for t in pool.tensors.values()]
        x, context = ids, {}
        for kind, piece in self._compiled_step:
            if kind == "graph":
                x = piece(x, slots, positions, pool_tensors, context)
            elif n:  # one eager layer, on the real rows (padding rows' outputs stay 0)
                layer, which, kind, module, norm = piece
                h = norm(x[:n])
                if kind == _PAGED:
                    y = self._attention(layer, module, h, rows, paged)
                else:
                    y = self._stateful(layer, which, kind, module, h, rows, slots[:n], paged[0],
                                       None)
                x = torch.cat([x[:n] + y, x[n:]])
        return x[:n]


def _slot_order(slots: list[int]) -> tuple[list[int] | None, slice | None]:
    """(the order that sorts the rows by slot, None if sorted already; the slots as one range
    of the pool, None if they are not one)."""
    ordered = sorted(slots)
    if ordered[-1] - ordered[0] != len(slots) - 1:
        return None, None
    order = None if ordered == slots else sorted(range(len(slots)), key=slots.__getitem__)
    return order, slice(ordered[0], ordered[-1] + 1)


def _store_for(module: torch.nn.Module | None, one: MixerState | None,
               two: MixerState | None) -> str:
    """Where a layer's state lives, from its states after one and after two tokens."""
    if module is None or (one is None and two is None):
        return _STATELESS
    if isinstance(module, Attention) and isinstance(one, AttentionState):
        return _PAGED
    if one is None or two is None or type(one) is not type(two):
        return _PER_REQUEST
    names = {field.name for field in dataclasses.fields(one)}
    # a position the state also takes per row (the padding contract's next_positions)
    positioned = "next_positions" in names and one.next_positions is None
    for name in names - ({"position", "next_positions"} if positioned else set()):
        a, b = getattr(one, name), getattr(two, name)
        if isinstance(a, torch.Tensor):
            if not isinstance(b, torch.Tensor) or a.shape != b.shape:
                return _PER_REQUEST  # grows with the sequence
        elif isinstance(a, int) and not isinstance(a, bool):
            return _PER_REQUEST  # a length or a position, one for the whole batch
        elif a != b:
            return _PER_REQUEST
    return _POSITIONED_SLOTS if positioned else _SLOTS


__all__ = ["Engine", "FINISH_REASONS", "Request", "TokenEvent"]
