"""Bounded mixers' recurrent states stored in bfloat16 or int8 between decode steps.

    result = zoo.infer.generate(model, prompts, state_dtype="int8")
    result.stats.state_bytes   # the stored bytes per sequence

A decode step reads and writes each bounded state in its compute dtype (float32 for the
recurrent sums, whatever the model's dtype); between steps the policy keeps the state's
recurrent sums stored: "bfloat16" by a cast, "int8" symmetric with one float32 scale per vector
along the last dimension. That layout gives one scale per (row, head, key channel) of a
(B, H, K, V) state S = sum_t decay_t k_t v_t^T: a key channel's row has its own decay (RWKV-6/7,
GLA and KDA decay per key channel) and its own key scale, so rows differ by orders of magnitude
while the entries of one row do not; Mamba's (B, d_inner, N) state gets one per channel, which
has its own dt and input. A scale costs 4 bytes per row of 16 or more codes.

Which families tolerate it was measured (`zoo bench state-quant`, benchmarks/results/cpu/
state-quant.md: logits' relative error over 256 greedy decode steps, random float32 models
from tiny to 130M shapes, tolerated when it stays under TOLERATED_ERROR): Mamba's and Mamba-2's
SSM states and RWKV-7's take both formats, RWKV-6's and LoLCATs' linear sums bfloat16 only;
undecayed sums (linear attention, the bounded-memory Linformer), RetNet's near-1 decays and the
delta rule (DeltaNet, Gated DeltaNet, KDA) stay float (NOT_TOLERATED says why).
Short-convolution windows, token shifts, LoLCATs' softmax window and RWKV-4's log-domain triple
always stay float (KEPT_FLOAT), as does every state that grows with the sequence (attention's KV
cache has its own option).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from zoo.cache import ZooCache
from zoo.layers import MixerState
from zoo.layers.bounded_memory import BoundedMemoryState
from zoo.layers.deltanet import DeltaRuleState
from zoo.layers.linear_attention import LinearAttentionState
from zoo.layers.mamba import MambaState
from zoo.layers.mamba2 import Mamba2State
from zoo.layers.retnet import RetNetState
from zoo.layers.rwkv4 import Rwkv4State
from zoo.layers.rwkv6 import Rwkv6State
from zoo.layers.rwkv7 import Rwkv7State
from zoo.layers.window_linear_attention import WindowLinearAttentionMixerState

STATE_DTYPES: tuple[str, ...] = ("bfloat16", "int8")
INT8_MAX = 127  # symmetric: codes in [-127, 127], so -x is exactly representable too

_CONV_REASON = ("a short convolution's last few inputs: a few hundred bytes, and an input error "
                "there reaches every later output unscaled")
_SHIFT_REASON = "the previous token's input (token shift): d_model values, nothing worth saving"

# The fields of each bounded state that a format may store: its recurrent sums.
STORED_FIELDS: dict[type[MixerState], tuple[str, ...]] = {
    LinearAttentionState: ("memory",),
    RetNetState: ("memory",),
    DeltaRuleState: ("recurrent_state",),  # DeltaNet, Gated DeltaNet, KDA
    MambaState: ("ssm_state",),
    Mamba2State: ("ssm_state",),
    Rwkv6State: ("wkv",),
    Rwkv7State: ("wkv",),
    WindowLinearAttentionMixerState: ("S", "z"),
    BoundedMemoryState: ("keys", "values", "control"),
}

# The float fields of the bounded states that the policy keeps float, and why (one line each).
KEPT_FLOAT: dict[type[MixerState], dict[str, str]] = {
    DeltaRuleState: {"conv_state": _CONV_REASON},
    MambaState: {"conv_state": _CONV_REASON},
    Mamba2State: {"conv_state": _CONV_REASON},
    Rwkv4State: {
        "shift": _SHIFT_REASON,
        "wkv": "RWKV-4's (num, den, max) triple is log-domain: max is an exponent, and num and "
               "den are relative to exp(max); 12 bytes a channel, nothing worth saving",
    },
    Rwkv6State: {"shift": _SHIFT_REASON},
    Rwkv7State: {"shift": _SHIFT_REASON},
    WindowLinearAttentionMixerState: {
        name: "LoLCATs' softmax window holds its last tokens' exact keys, values and key "
              "features: attention's cache in all but name, not a recurrent sum"
        for name in ("k", "v", "phi_k")
    },
}


TOLERATED_ERROR = 1e-2  # logits' relative error, max over 256 decode steps (module doc)
_UNDECAYED = ("an undecayed running sum grows with every token, so an update falls below the "
              "stored format's resolution of the sum and is lost: error grows with length")
_DELTA_RULE = ("the delta rule keeps directions no key erases at eigenvalue 1 and reads S back "
               "(k^T S) to write it, so a rounding error persists and feeds the next writes")
# The families whose recurrent sums do not tolerate a format, and why (the measurement above).
NOT_TOLERATED: dict[str, dict[type[MixerState], str]] = {
    "bfloat16": {
        LinearAttentionState: _UNDECAYED,
        BoundedMemoryState: _UNDECAYED,
        RetNetState: "RetNet's slow heads decay by 1 - 2^-(5+h), nearly not at all: " + _UNDECAYED,
        DeltaRuleState: _DELTA_RULE,
    },
}
NOT_TOLERATED["int8"] = {
    **NOT_TOLERATED["bfloat16"],
    Rwkv6State: "RWKV-6's per-channel decays near 1 leave rows that int8's per-row scale "
                "resolves coarsely (1.7% logits error at worst in 256 steps; bfloat16 0.5%)",
    WindowLinearAttentionMixerState: _UNDECAYED,
}


def policy_for(state_dtype: str) -> dict[type[MixerState], tuple[str, ...]]:
    """The fields stored under `state_dtype`: STORED_FIELDS less the families NOT_TOLERATED."""
    check_state_dtype(state_dtype)
    refused = NOT_TOLERATED[state_dtype]
    return {cls: fields for cls, fields in STORED_FIELDS.items() if cls not in refused}


def check_state_dtype(state_dtype: str | None) -> None:
    """A ValueError naming `state_dtype` unless it is None (float states) or one of STATE_DTYPES."""
    if state_dtype is not None and state_dtype not in STATE_DTYPES:
        raise ValueError(
            f"state_dtype={state_dtype!r} is not one of {STATE_DTYPES} (or None: float states)"
        )


def stored_fields(
    state: MixerState, policy: dict[type[MixerState], tuple[str, ...]]
) -> tuple[str, ...]:
    """The fields of `state` that `policy` (a class -> fields map) stores; () for a state it
    leaves alone."""
    for cls, fields in policy.items():
        if isinstance(state, cls):
            return fields
    return ()


@dataclasses.dataclass
class StoredTensor:
    """One state tensor as stored: bfloat16 values (scale None) or int8 codes with a float32
    scale broadcast over the last dimension; `dtype` is what `restore` gives back."""

    codes: torch.Tensor
    scale: torch.Tensor | None
    dtype: torch.dtype

    def restore(self) -> torch.Tensor:
        if self.scale is None:
            return self.codes.to(self.dtype)
        return (self.codes.to(torch.float32) * self.scale).to(self.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes] if self.scale is None else [self.codes, self.scale]

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> StoredTensor:
        scale = None if self.scale is None else fn(self.scale)
        return StoredTensor(fn(self.codes), scale, self.dtype)


def quantize_int8(x: torch.Tensor) -> StoredTensor:
    """x as int8 codes with one float32 scale per vector along the last dimension (amax / 127);
    each element restores within scale / 2 (an all-zero vector takes scale 1 and codes 0)."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).to(torch.float32)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    codes = torch.round(x / scale.to(x.dtype)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return StoredTensor(codes, scale, x.dtype)


def store_tensor(x: torch.Tensor, state_dtype: str) -> StoredTensor:
    if state_dtype == "int8":
        return quantize_int8(x)
    return StoredTensor(x.to(torch.bfloat16), None, x.dtype)


@dataclasses.dataclass
class StoredState(MixerState):
    """A bounded mixer's state between decode steps: `values` maps each field of the original
    `state_class` to its value, a StoredTensor for the stored fields. Its nbytes are the stored
    bytes; `restore` rebuilds the state the mixer reads."""

    state_class: type
    values: dict

    def tensors(self) -> list[torch.Tensor]:
        found = []
        for value in self.values.values():
            if isinstance(value, StoredTensor):
                found += value.tensors()
            elif isinstance(value, torch.Tensor):
                found.append(value)
        return found

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> StoredState:
        mapped = {}
        for name, value in self.values.items():
            if isinstance(value, (StoredTensor, torch.Tensor)):
                value = value.map_tensors(fn) if isinstance(value, StoredTensor) else fn(value)
            mapped[name] = value
        return StoredState(self.state_class, mapped)

    def restore(self) -> MixerState:
        return self.state_class(**{
            name: value.restore() if isinstance(value, StoredTensor) else value
            for name, value in self.values.items()
        })


def store_state(
    state: MixerState | None, state_dtype: str,
    policy: dict[type[MixerState], tuple[str, ...]] | None = None,
) -> MixerState | None:
    """`state` with the fields `policy` (default `policy_for(state_dtype)`) names stored as
    `state_dtype` (a StoredState), or `state` itself when the policy leaves it alone."""
    if state is None or isinstance(state, StoredState):
        return state
    fields = stored_fields(state, policy_for(state_dtype) if policy is None else policy)
    if not fields:
        return state
    values = {}
    for f in dataclasses.fields(state):
        value = getattr(state, f.name)
        if f.name in fields and isinstance(value, torch.Tensor) and value.is_floating_point():
            value = store_tensor(value, state_dtype)
        values[f.name] = value
    return StoredState(type(state), values)


def restore_state(state: MixerState | None) -> MixerState | None:
    """The state a mixer reads: a StoredState restored, anything else as it is."""
    return state.restore() if isinstance(state, StoredState) else state


def store_cache(
    cache: ZooCache, state_dtype: str,
    policy: dict[type[MixerState], tuple[str, ...]] | None = None,
) -> None:
    """In place: every bounded state of `cache` stored as `state_dtype` (see the module doc)."""
    cache.layers = cache.map_states(lambda s: store_state(s, state_dtype, policy)).layers


def restore_cache(cache: ZooCache) -> None:
    """In place: every stored state of `cache` back in the dtype its mixer computes in."""
    cache.layers = cache.map_states(restore_state).layers


def stored_nbytes(cache: ZooCache, state_dtype: str | None) -> int:
    """Bytes per sequence `cache` takes with its bounded states stored as `state_dtype` (None:
    as they are); the cache itself is left as it is."""
    if state_dtype is None:
        return cache.nbytes()
    return cache.map_states(lambda s: store_state(s, state_dtype)).nbytes()
