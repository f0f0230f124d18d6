"""The state contract every sequence mixer obeys, and the small interface every FFN obeys.

    y, state = mixer(x, state=None, padding_mask=None)   # x: (B, T, d_model) -> y: (B, T, d_model)

`state=None` starts from the empty state; the returned state is the state after the last token
of x. Running x whole, split at any point with the state carried, or one token at a time gives
the same y. The mixer picks its parallel, chunked or recurrent form; the caller never does.

`padding_mask` is None (no padding: the fast path, no extra work) or a (B, T) bool tensor, True
at a real token. A False position is a no-op on the state, exactly: a decay is 1 and the update
zero there, a convolution's window or token shift does not move, attention never attends to it.
The output there is finite (zeros preferred) and never read. Left padding (False before a row's
first True) and right padding (False after its last True: the returned state is the state after
the row's last real token) are exact in every form, so a padded row gives what it gives alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

HALF_DTYPES = (torch.bfloat16, torch.float16)


def fill_padding(
    x: torch.Tensor, padding_mask: torch.Tensor | None, value: float = 0.0
) -> torch.Tensor:
    """x (B, T, ...) with `value` at the padded positions (padding_mask (B, T) False), x itself
    when padding_mask is None: zero an update, or set a decay to 1 (a log-decay to 0), there."""
    if padding_mask is None:
        return x
    real = padding_mask.reshape(*padding_mask.shape, *([1] * (x.dim() - 2)))
    return torch.where(real, x, torch.tensor(value, dtype=x.dtype, device=x.device))


def check_padding_mask(x: torch.Tensor, padding_mask: torch.Tensor | None, where: str) -> None:
    """A clear error for a padding_mask that is not (B, T) bool for x (B, T, ...): an integer
    attention_mask passed on as it is would broadcast and negate as numbers, silently wrong."""
    if padding_mask is None:
        return
    if padding_mask.dtype != torch.bool or tuple(padding_mask.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"{where}: padding_mask must be a (B, T) = {tuple(x.shape[:2])} bool tensor, True "
            f"at real tokens; got {tuple(padding_mask.shape)} {padding_mask.dtype}"
        )


def at_least_float32(
    fn: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """`fn`, the conversion `nn.Module._apply` maps over a module's tensors (.to(), .half(),
    .cuda()), giving float32 where it would give bfloat16 or float16, converted from the tensor
    as it was (so nothing is rounded). A module whose `_apply` wraps `fn` in it keeps its
    tensors (frequencies, filter generators) float32 through a cast of the model to half
    precision, on whatever device the cast moves it to."""

    def apply(tensor: torch.Tensor) -> torch.Tensor:
        moved = fn(tensor)
        if moved.dtype in HALF_DTYPES:
            return tensor.to(device=moved.device, dtype=torch.float32)
        return moved

    return apply


@dataclasses.dataclass
class MixerState:
    """Base of every mixer's state: a dataclass whose tensor fields all have batch first."""

    def tensors(self) -> list[torch.Tensor]:
        values = (getattr(self, f.name) for f in dataclasses.fields(self))
        return [v for v in values if isinstance(v, torch.Tensor)]

    @property
    def batch_size(self) -> int:
        return self.tensors()[0].shape[0]

    def nbytes(self) -> int:
        """Bytes held per sequence (the logical size, as `Mixer.state_size` reports it)."""
        return sum(t.numel() * t.element_size() for t in self.tensors()) // self.batch_size

    def map_tensors(self, fn) -> MixerState:
        """A new state of the same class with `fn` applied to every tensor field."""
        changes = {
            f.name: fn(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **changes)

    def index_select(self, rows: torch.Tensor) -> MixerState:
        """Keep (or reorder) the batch rows `rows`: beam search, finished sequences."""
        return self.map_tensors(lambda t: t.index_select(0, rows))

    def clone(self) -> MixerState:
        return self.map_tensors(torch.clone)

    def reserve(self, tokens: int) -> MixerState:
        """A state with room for `tokens` more without reallocating. Bounded states always have
        it; growing ones (a KV cache) preallocate, so a compiled decode step sees fixed shapes."""
        return self


class Mixer(nn.Module):
    """A causal sequence mixer behind the state contract (see the module docstring).

    Subclasses set `state_class` and `bounded` (state size constant in the sequence length) and
    implement `forward`, `init_state` and `state_size`. `test_variants` lists option sets that
    tests/layers/test_contract.py runs besides the defaults.
    """

    state_class: ClassVar[type[MixerState]] = MixerState
    bounded: ClassVar[bool] = True
    test_variants: ClassVar[list[dict]] = []
    # True: forward also takes `context`, a dict one model call shares across its layers (RWKV-7's
    # layer 0 leaves its values there for the later layers).
    takes_forward_context: ClassVar[bool] = False

    def __init__(self, d_model: int, layer_idx: int = 0):
        super().__init__()
        self.d_model = d_model
        self.layer_idx = layer_idx

    def forward(
        self, x: torch.Tensor, state: MixerState | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MixerState]:
        """x (B, T, d_model) -> (y, the state after x's last real token); padding_mask (B, T)
        bool, True at real tokens, or None: the module docstring's contract."""
        raise NotImplementedError

    def init_state(
        self, batch_size: int, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> MixerState:
        raise NotImplementedError

    def state_size(self, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of state per sequence after `seq_len` tokens."""
        raise NotImplementedError

    def check_input(self, x: torch.Tensor, state: MixerState | None,
                    padding_mask: torch.Tensor | None = None) -> None:
        """Clear errors for the mistakes the contract cannot survive silently: x's shape, a
        padding_mask that is not (B, T) bool, a state from another mixer or batch size."""
        name = type(self).__name__
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"{name}: x must be (B, T, d_model={self.d_model}), got {tuple(x.shape)}"
            )
        check_padding_mask(x, padding_mask, f"{name} (layer {self.layer_idx})")
        if state is None:
            return
        if not isinstance(state, self.state_class):
            raise TypeError(
                f"{name} (layer {self.layer_idx}) needs a {self.state_class.__name__}, "
                f"got a {type(state).__name__}: a state from another mixer"
            )
        if state.batch_size != x.shape[0]:
            raise ValueError(
                f"{name} (layer {self.layer_idx}): state batch size {state.batch_size} "
                f"!= input batch size {x.shape[0]}"
            )


class FFN(nn.Module):
    """A position-wise feed-forward layer with the mixer's calling convention.

    Most FFNs keep no state across time and return None; RWKV's channel mixing carries one token
    of token shift. FFNs with auxiliary losses (MoE) set `self.aux_loss` during forward; the model
    adds it to the language-model loss.
    """

    state_class: ClassVar[type[MixerState] | None] = None

    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = d_model
        self.aux_loss: torch.Tensor | None = None

    def forward(
        self, x: torch.Tensor, state: MixerState | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MixerState | None]:
        """As a mixer's: padding_mask (B, T) bool or None; a stateless FFN ignores it (its
        output at a padded position is never read), a stateful one leaves its state there."""
        raise NotImplementedError

    def init_state(self, batch_size: int, device=None, dtype=None) -> MixerState | None:
        return None

    def state_size(self, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        return 0
