"""`ZooCache`: every layer's mixer and FFN state in one object that `generate()` can carry.

zoo's own state dataclasses stay the single source of truth; this is a list of them plus the
few methods transformers' generation loop asks a cache for.
"""

from __future__ import annotations

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

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """In place, for transformers' beam search."""
        self.layers = self.index_select(beam_idx).layers
