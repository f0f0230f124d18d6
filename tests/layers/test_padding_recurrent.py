"""Exact padding in the recurrent and convolutional mixers (layers/base.py's padding contract,
#26): in a padded batch every row gives, at its real positions, what it gives alone, and the
state it returns is the state it has alone (so decoding carries on alike), for left and right
padding, run whole, in chunks and token by token, and through the Triton kernels. Float64
where the mixer takes it, so that anything but a rounding shows."""

import copy
import dataclasses
import functools
import importlib

import pytest
import torch

from zoo.layers import build_ffn, build_mixer
from zoo.layers import deltanet as deltanet_module
from zoo.layers.base import fill_padding
from zoo.layers.hyena import HyenaState
from zoo.layers.rwkv7 import FIRST_VALUE
from zoo.testing import assert_close

D_MODEL = 32
LENGTHS = (9, 6, 1, 4)  # the longest row fills the batch; one row is a single token
T = max(LENGTHS)
FLOAT64_TOLERANCE = 1e-11
# Mamba-2's dt and Hyena's filter features are float32 inside a float64 model, and torch's
# vectorised float32 functions round a tensor's tail elements differently from its body: the
# same row alone and in a batch (padded or not) differ there by about 1e-8
TOLERANCES = {"mamba2": 1e-6, "hyena": 1e-6}
MIXERS = {
    "mamba": {"d_state": 8, "d_conv": 4},
    "mamba2": {"d_state": 16, "head_dim": 16, "n_groups": 2, "chunk_size": 4},
    "rwkv4": {},
    "rwkv6": {"head_size": 16, "mix_lora": 8, "decay_lora": 8, "chunk_size": 4},
    "rwkv7": {"head_size": 16, "decay_lora": 8, "iclr_lora": 8, "value_lora": 8,
              "gate_lora": 8, "chunk_size": 4},
    "hyena": {"order": 2, "max_len": 64, "filter_width": 16, "filter_bands": 4},
    "deltanet": {"n_heads": 2, "chunk_size": 4},
    # without the convolution, which zeroes q, k and v at padded steps, only beta = 0 stops
    # their writes there
    "deltanet_without_conv": {"type": "deltanet", "n_heads": 2, "use_short_conv": False,
                              "allow_neg_eigval": True, "chunk_size": 4},
    "gated_deltanet": {"n_heads": 2, "n_value_heads": 4, "head_dim": 16, "chunk_size": 4},
    "kda": {"n_heads": 2, "decay_lora": 8, "gate_lora": 8, "chunk_size": 4},
}
FFNS = ("rwkv4_cmix", "rwkv6_cmix", "rwkv7_cmix")


def _cuts(form: str, length: int) -> list[int]:
    """Where a batch of `length` tokens is cut: run whole, in three chunks, or token by token."""
    return {"whole": [], "chunks": [2, length - 2], "steps": list(range(1, length))}[form]


def _mixer(name: str, dtype=torch.float64, **extra):
    torch.manual_seed(0)
    mixer = build_mixer({"type": name, **MIXERS[name], **extra}, D_MODEL, layer_idx=0)
    return mixer.to(dtype).eval()


def _padded(rows: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """rows (1, L_i, D) -> x (B, T, D) and padding_mask (B, T), padded on `side`; the padding
    holds large random values, so a mixer that lets them in is caught."""
    length = max(row.shape[1] for row in rows)
    x = 10 * torch.randn(len(rows), length, D_MODEL, dtype=rows[0].dtype)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, row in enumerate(rows):
        span = slice(length - row.shape[1], length) if side == "left" else slice(0, row.shape[1])
        x[i, span], mask[i, span] = row[0], True
    return x, mask


def _run(layer, x, mask, cuts, state=None):
    """x run in the pieces `cuts` makes, with its padding_mask, the state carried."""
    outputs = []
    bounds = [0, *cuts, x.shape[1]]
    for start, end in zip(bounds[:-1], bounds[1:]):
        y, state = layer(x[:, start:end], state, padding_mask=mask[:, start:end])
        outputs.append(y)
    return torch.cat(outputs, dim=1), state


def _decode(layer, state, tokens):
    """tokens (B, S, D) one at a time after `state`, without padding."""
    outputs = [tokens[:, :0]]
    for t in range(tokens.shape[1]):
        y, state = layer(tokens[:, t : t + 1], state)
        outputs.append(y)
    return torch.cat(outputs, dim=1)


def _state_rows(state, row: int, real: int) -> dict[str, torch.Tensor]:
    """A state's tensors for one batch row, by field name. Hyena's history keeps a padded row's
    `T - real` padding as zeros in front of it: they are checked to be zeros and cut off."""
    if isinstance(state, HyenaState):
        history = state.inputs[row, :, : state.length]
        padding = history.shape[1] - real
        assert torch.equal(history[:, :padding], torch.zeros_like(history[:, :padding])), (
            "hyena: a padded position left something other than zeros in the history")
        return {"conv": state.conv[row], "inputs": history[:, padding:]}
    return {f.name: getattr(state, f.name)[row] for f in dataclasses.fields(state)
            if isinstance(getattr(state, f.name), torch.Tensor)}


def check_padded_rows_equal_rows_alone(layer, dtype, tolerance, sides=("left", "right"),
                                       forms=("whole", "chunks", "steps"), after_state=None,
                                       lengths=LENGTHS, decode_steps=3):
    """The whole property, raising AssertionError where it fails: outputs at real positions,
    the returned state row by row, and `decode_steps` steps after it, against each row alone.
    `after_state` (batch of len(LENGTHS)) starts every run from a carried state instead of
    the empty one: padding met in the middle of a sequence."""
    generator = torch.Generator().manual_seed(3)
    rows = [torch.randn(1, L, D_MODEL, generator=generator, dtype=dtype) for L in lengths]
    tokens = torch.randn(len(rows), decode_steps, D_MODEL, generator=generator, dtype=dtype)
    alone = []
    for i, row in enumerate(rows):
        start = after_state.index_select(torch.tensor([i])) if after_state is not None else None
        y, state = layer(row, copy.deepcopy(start))
        alone.append((y[0], state, _decode(layer, state, tokens[i : i + 1])[0]))
    for side in sides:
        x, mask = _padded(rows, side)
        for form in forms:
            y, state = _run(layer, x, mask, _cuts(form, x.shape[1]), copy.deepcopy(after_state))
            assert torch.isfinite(y).all(), f"{side}-padded {form}: a non-finite output"
            assert torch.equal(y[~mask], torch.zeros_like(y[~mask])), (
                f"{side}-padded {form}: the output at padded positions is not zero")
            decoded = _decode(layer, state, tokens)
            for i, (want_y, want_state, want_decoded) in enumerate(alone):
                where = f"{side}-padded {form}, row {i} ({lengths[i]} tokens)"
                assert_close(f"{where}: y", want_y, y[i][mask[i]], tolerance)
                real = lengths[i] + (after_state.length if isinstance(after_state, HyenaState)
                                     else 0)
                got_state = _state_rows(state, i, real)
                for field, want in _state_rows(want_state, 0, real).items():
                    assert_close(f"{where}: state.{field}", want, got_state[field], tolerance)
                if decode_steps:
                    assert_close(f"{where}: decoded after", want_decoded, decoded[i], tolerance)


@pytest.mark.parametrize("name", sorted(MIXERS))
@torch.no_grad()
def test_padded_rows_equal_rows_alone_float64(name):
    check_padded_rows_equal_rows_alone(_mixer(name), torch.float64,
                                       TOLERANCES.get(name, FLOAT64_TOLERANCE))


@pytest.mark.parametrize("name", sorted(MIXERS))
@torch.no_grad()
def test_padding_in_the_middle_of_a_sequence(name):
    """From a carried state, as a prefill continued in chunks or a batch that joins a running
    one: the padding then meets a state that is not empty."""
    mixer = _mixer(name)
    _, state = mixer(torch.randn(len(LENGTHS), 5, D_MODEL, dtype=torch.float64))
    check_padded_rows_equal_rows_alone(mixer, torch.float64,
                                       TOLERANCES.get(name, FLOAT64_TOLERANCE),
                                       forms=("whole", "chunks"), after_state=state)


@pytest.mark.parametrize("name", sorted(MIXERS))
@torch.no_grad()
def test_bf16_padded_rows_equal_rows_alone(name):
    """bf16 weights and inputs through the padded paths (their casts: RWKV-4's keys to float32,
    Hyena's history buffer): within a few bf16 units (2^-8) of the row alone, which rounds
    differently where its chunks or windows start elsewhere (measured: up to 0.0094, Mamba-2)."""
    check_padded_rows_equal_rows_alone(_mixer(name, torch.bfloat16), torch.bfloat16,
                                       4 * 2.0**-8, forms=("whole", "chunks"))


@pytest.mark.parametrize("name", FFNS)
@torch.no_grad()
def test_channel_mix_padded_rows_equal_rows_alone(name):
    torch.manual_seed(0)
    ffn = build_ffn({"type": name}, D_MODEL).double().eval()
    check_padded_rows_equal_rows_alone(ffn, torch.float64, FLOAT64_TOLERANCE)


@pytest.mark.parametrize("name", ["mamba", "rwkv4", "hyena", "deltanet"])
@torch.no_grad()
def test_any_padding_pattern_is_skipped(name):
    """Padding scattered through a row (not only at one end) still leaves the real tokens what
    they are alone: convolution windows and token shifts reach over the holes."""
    mixer = _mixer(name)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 12, D_MODEL, generator=generator, dtype=torch.float64)
    mask = torch.rand(2, 12, generator=generator) < 0.6
    mask[:, 3] = True
    y, state = _run(mixer, x, mask, [5])
    for i in range(2):
        want, want_state = mixer(x[i : i + 1, mask[i]])
        assert_close(f"{name} row {i}: y", want[0], y[i][mask[i]], FLOAT64_TOLERANCE)
        real = int(mask[i].sum())
        got_state = _state_rows(state, i, real)
        for field, expected in _state_rows(want_state, 0, real).items():
            assert_close(f"{name} row {i}: state.{field}", expected, got_state[field],
                         FLOAT64_TOLERANCE)


@torch.no_grad()
def test_rwkv7_value_residual_padded_across_layers():
    """Layer 1 mixes in layer 0's values of the same tokens (the forward context): with
    padding, a row of two layers still gives what it gives alone."""
    torch.manual_seed(0)
    layers = [build_mixer({"type": "rwkv7", **MIXERS["rwkv7"], "n_layers": 2}, D_MODEL,
                          layer_idx=i).double().eval() for i in range(2)]

    def stack(x, state=None, padding_mask=None):
        context, states, y = {}, [], x
        for layer, layer_state in zip(layers, state or [None, None]):
            y, s = layer(y, layer_state, padding_mask=padding_mask, context=context)
            states.append(s)
        assert context[FIRST_VALUE].shape == x.shape
        return y, StackState(*states)

    @dataclasses.dataclass
    class StackState:
        first: object
        second: object

        def __iter__(self):
            return iter((self.first, self.second))

        def index_select(self, rows):
            return StackState(self.first.index_select(rows), self.second.index_select(rows))

    generator = torch.Generator().manual_seed(3)
    rows = [torch.randn(1, L, D_MODEL, generator=generator, dtype=torch.float64)
            for L in LENGTHS]
    for side in ("left", "right"):
        x, mask = _padded(rows, side)
        y, state = _run(stack, x, mask, _cuts("chunks", x.shape[1]))
        tokens = torch.randn(len(rows), 2, D_MODEL, generator=generator, dtype=torch.float64)
        decoded = _decode(stack, state, tokens)
        for i, row in enumerate(rows):
            want, want_state = stack(row)
            assert_close(f"{side} row {i}: y", want[0], y[i][mask[i]], FLOAT64_TOLERANCE)
            want_decoded = _decode(stack, want_state, tokens[i : i + 1])
            assert_close(f"{side} row {i}: decoded", want_decoded[0], decoded[i],
                         FLOAT64_TOLERANCE)


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_right_padded_training_gradients_equal_rows_alone(name):
    """A right-padded training batch: the gradients reaching each row's real inputs are those
    of the row alone, and none reaches the padding."""
    mixer = _mixer(name).train()
    generator = torch.Generator().manual_seed(6)
    rows = [torch.randn(1, L, D_MODEL, generator=generator, dtype=torch.float64)
            for L in LENGTHS[:2]]
    x, mask = _padded(rows, "right")
    x = x[:2].requires_grad_()
    upstream = torch.randn(2, T, D_MODEL, generator=generator, dtype=torch.float64)
    y, _ = mixer(x, padding_mask=mask[:2])
    (y * upstream).sum().backward()
    assert torch.equal(x.grad[~mask[:2]], torch.zeros_like(x.grad[~mask[:2]]))
    for i, row in enumerate(rows):
        row = row.clone().requires_grad_()
        want, _ = mixer(row)
        (want * upstream[i : i + 1, : row.shape[1]]).sum().backward()
        assert_close(f"{name} row {i}: dx", row.grad[0], x.grad[i][mask[i]],
                     TOLERANCES.get(name, FLOAT64_TOLERANCE))


def _check_triton(mixer):
    """The property in float32, kept small for the interpreter: two rows, each run whole after
    a carried state (so the padding meets a state that is not empty), left and right."""
    _, state = mixer(torch.randn(2, 3, D_MODEL))
    check_padded_rows_equal_rows_alone(mixer, torch.float32, 1e-5, forms=("whole",),
                                       lengths=(5, 2), decode_steps=0, after_state=state)


# the interpreter takes 5-8 s over the chunked Triton kernels of these (on a shared CPU)
SLOW = pytest.mark.slow


@pytest.mark.parametrize("name", ["rwkv4", pytest.param("rwkv6", marks=SLOW), "rwkv7"])
@torch.no_grad()
def test_triton_backend_padded_rows_equal_rows_alone(name):
    """The mixers with a `backend` option, through their Triton kernels (the interpreter on a
    CPU), in float32."""
    extra = {"chunk_size": 16} if name == "rwkv6" else {}  # its Triton chunks: 16 at least
    _check_triton(_mixer(name, torch.float32, backend="triton", **extra))


# the ops a mixer without a `backend` option calls, by the module that calls them
TRITON_OPS = {
    "mamba": {"mamba": ["causal_conv1d", "selective_scan"]},
    "mamba2": {"mamba": ["causal_conv1d"], "mamba2": ["linear_attention"]},
    "gated_deltanet": {"mamba": ["causal_conv1d"], "deltanet": ["delta_rule"]},
    "hyena": {"hyena": ["causal_conv1d", "fft_conv"]},
}
SLOW_OPS = {"mamba2", "gated_deltanet"}


@pytest.mark.parametrize("name", [pytest.param(name, marks=SLOW) if name in SLOW_OPS else name
                                  for name in sorted(TRITON_OPS)])
@torch.no_grad()
def test_triton_ops_padded_rows_equal_rows_alone(name, monkeypatch):
    """The mixers whose ops pick Triton by device alone (CUDA), with those ops forced to their
    Triton kernels (the interpreter on a CPU), in float32."""
    for module, ops in TRITON_OPS[name].items():
        module = importlib.import_module(f"zoo.layers.{module}")
        for op in ops:
            monkeypatch.setattr(module, op, functools.partial(getattr(module, op),
                                                              backend="triton"))
    extra = {"chunk_size": 16} if name == "mamba2" else {}  # its Triton chunks: 16 at least
    _check_triton(_mixer(name, torch.float32, **extra))


@pytest.mark.parametrize("name", sorted(MIXERS) + list(FFNS))
@torch.no_grad()
def test_a_mask_that_is_not_bool_b_t_is_refused_by_name(name):
    layer = (build_ffn({"type": name}, D_MODEL) if name in FFNS
             else _mixer(name, torch.float32))
    x = torch.randn(2, 5, D_MODEL)
    integer_mask = torch.ones(2, 5, dtype=torch.long)  # attention_mask's own dtype
    for mask in (integer_mask, torch.ones(2, 4, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"padding_mask must be a \(B, T\) = \(2, 5\) bool"):
            layer(x, padding_mask=mask)


def test_a_decay_at_padded_steps_is_caught(monkeypatch):
    """The check is sensitive: KDA with its per-channel decay left unmasked at padded steps
    (beta and the convolution still masked) fails it."""
    mixer = _mixer("kda")
    with torch.no_grad():
        check_padded_rows_equal_rows_alone(mixer, torch.float64, FLOAT64_TOLERANCE,
                                           sides=("right",), forms=("whole",))

    def decay_left_alone(x, padding_mask, value=0.0):
        # KDA's decay is the only (B, T, H, K) tensor the delta-rule mixers fill
        return x if x.dim() == 4 else fill_padding(x, padding_mask, value)

    monkeypatch.setattr(deltanet_module, "fill_padding", decay_left_alone)
    with torch.no_grad(), pytest.raises(AssertionError, match="state"):
        check_padded_rows_equal_rows_alone(mixer, torch.float64, FLOAT64_TOLERANCE,
                                           sides=("right",), forms=("whole",))
