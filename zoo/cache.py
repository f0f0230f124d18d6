"""`ZooCache`: every layer's mixer and FFN state in one object that `generate()` can carry.

zoo's own state dataclasses stay the single source of truth; this is a list of them plus the
few methods transformers' generation loop asks a cache for.
"""

from __future__ import annotations

import dataclasses

import torch

from zoo.layers import MixerState

LayerState = tuple[MixerState | None, MixerState | None]


class ZooCache:
    """layers[i] = (mixer_state, ffn_state) of layer i, or None before the first token."""

    is_compileable = False  # transformers asks; zoo compiles its own decode step instead
    is_croppable = False

    def __init__(self, n_layers: int):
        self.layers: list[LayerState | None] = [None] * n_layers
        self.seen_tokens = 0

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        kinds = [type(s[0]).__name__ if s else "empty" for s in self.layers]
        return f"ZooCache(seen_tokens={self.seen_tokens}, layers={kinds})"

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    @property
    def batch_size(self) -> int | None:
        for layer in self.layers:
            for state in layer or ():
                if state is not None:
                    return state.batch_size
        return None

    def nbytes(self) -> int:
        """Bytes of state per sequence, summed over layers."""
        return sum(s.nbytes() for layer in self.layers if layer for s in layer if s is not None)

    def _map(self, fn) -> ZooCache:
        out = ZooCache(len(self.layers))
        out.seen_tokens = self.seen_tokens
        out.layers = [
            tuple(fn(s) if s is not None else None for s in layer) if layer else None
            for layer in self.layers
        ]
        return out

    def map_states(self, fn) -> ZooCache:
        """A cache holding fn(state) for every layer's mixer and FFN state (None stays None):
        how a storage policy (zoo.infer.state_quant) swaps states between decode steps."""
        return self._map(fn)

    def index_select(self, rows: torch.Tensor) -> ZooCache:
        """A cache keeping (or reordering) the batch rows `rows`."""
        return self._map(lambda s: s.index_select(rows))

    def clone(self) -> ZooCache:
        return self._map(lambda s: s.clone())

    def reserve(self, tokens: int) -> None:
        """In place, before decoding: room in every state for `tokens` more (see
        MixerState.reserve), and every tensor contiguous. A prefill leaves some states as
        views whose strides depend on the prompt length; a decode step returns them
        contiguous, so a compiled step then sees one layout for every prompt."""
        self.layers = self._map(lambda s: s.reserve(tokens).map_tensors(_canonical)).layers

    def flatten(self) -> tuple[CacheLayout, list[torch.Tensor], list[int]]:
        """The cache as its layout (what stays fixed while decoding), its tensors and its
        integers (lengths, positions, seen_tokens first). A compiled decode step takes and
        returns these plain values: rebuilding state objects after every step was a tenth of
        a tiny model's step."""
        fields, tensors, ints = [], [], [self.seen_tokens]
        for layer in self.layers:
            if layer is None:
                fields.append(None)
                continue
            per_state = []
            for state in layer:
                if state is None:
                    per_state.append(None)
                    continue
                kinds = []
                for f in dataclasses.fields(state):
                    value = getattr(state, f.name)
                    if isinstance(value, torch.Tensor):
                        kinds.append((f.name, _TENSOR))
                        tensors.append(value)
                    elif isinstance(value, int) and not isinstance(value, bool):
                        kinds.append((f.name, _INT))
                        ints.append(value)
                    else:
                        kinds.append((f.name, _Constant(value)))
                per_state.append((type(state), tuple(kinds)))
            fields.append(tuple(per_state))
        return CacheLayout(tuple(fields)), tensors, ints

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """In place, for transformers' beam search."""
        self.layers = self.index_select(beam_idx).layers


def _canonical(t: torch.Tensor) -> torch.Tensor:
    """t with row-major strides, copied only when they differ. (`contiguous()` is not enough:
    it keeps any stride on a size-1 dimension, such as a batch of one, and compiled code
    guards on strides.)"""
    expected, step = [], 1
    for size in reversed(t.shape):
        expected.append(step)
        step *= max(size, 1)
    if t.stride() == tuple(reversed(expected)):
        return t
    return t.clone(memory_format=torch.contiguous_format)


_TENSOR, _INT = "tensor", "int"


@dataclasses.dataclass(frozen=True)
class _Constant:
    """A state field that is neither a tensor nor an int (None, a flag): part of the layout."""

    value: object


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """What `ZooCache.flatten` keeps apart from the values: per layer, per state, its class and
    for each field whether it is a tensor, an int or a constant. Hashable, so compiled steps
    can be kept per layout."""

    layers: tuple

    def unflatten(self, tensors: list[torch.Tensor], ints: list[int]) -> ZooCache:
        """The ZooCache that `flatten` took apart (new state objects, the same tensors)."""
        cache = ZooCache(len(self.layers))
        cache.seen_tokens = ints[0]
        next_tensor, next_int = iter(tensors), iter(ints[1:])
        for i, layer in enumerate(self.layers):
            if layer is None:
                continue
            states = []
            for spec in layer:
                if spec is None:
                    states.append(None)
                    continue
                cls, kinds = spec
                values = {}
                for name, kind in kinds:
                    if kind == _TENSOR:
                        values[name] = next(next_tensor)
                    elif kind == _INT:
                        values[name] = next(next_int)
                    else:
                        values[name] = kind.value
                states.append(cls(**values))
            cache.layers[i] = tuple(states)
        return cache
