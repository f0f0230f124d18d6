"""The state contract (docs/design.md), checked for every registered mixer and each of its
`test_variants`: registering a mixer is enough to have it tested here."""

import copy
import dataclasses

import pytest
import torch

from zoo.layers import MIXERS, MixerState, build_mixer
from zoo.testing import assert_close

D_MODEL = 64
CASES = [
    pytest.param(name, options, id=f"{name}-{i}")
    for name, cls in sorted(MIXERS.items())
    for i, options in enumerate([{}] + list(cls.test_variants))
]


def _mixer(name, options):
    torch.manual_seed(0)
    mixer = build_mixer({"type": name, **options}, D_MODEL, layer_idx=0).eval()
    return mixer


def _run_split(mixer, x, cuts):
    state, outputs = None, []
    bounds = [0, *cuts, x.shape[1]]
    for start, end in zip(bounds[:-1], bounds[1:]):
        y, state = mixer(x[:, start:end], state)
        outputs.append(y)
    return torch.cat(outputs, dim=1), state


@pytest.mark.parametrize("name,options", CASES)
@torch.no_grad()
def test_chunk_consistency(name, options):
    mixer = _mixer(name, options)
    x = torch.randn(2, 37, D_MODEL)
    whole, _ = mixer(x)
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        cuts = sorted(torch.randperm(35, generator=generator)[:3].add(1).tolist())
        split, _ = _run_split(mixer, x, cuts)
        assert_close(f"{name} split at {cuts}", whole, split, 1e-4)


@pytest.mark.parametrize("name,options", CASES)
@torch.no_grad()
def test_step_consistency(name, options):
    mixer = _mixer(name, options)
    x = torch.randn(2, 19, D_MODEL)
    whole, _ = mixer(x)
    stepped, _ = _run_split(mixer, x, list(range(1, 19)))
    assert_close(f"{name} token by token", whole, stepped, 1e-4)


# bf16 keeps 8 significant bits, so one rounding moves a value by at most U = 2^-8 of itself.
# A bf16 mixer's output is then within n * U of its float32 self (relative, in norm), n being
# the roundings on the longest path from x to y (every weight applied and every activation
# stored in bf16; what a mixer computes in float32 inside counts once, for its output). The
# errors add at most linearly; being random, they mostly add in quadrature: the measured ones
# sit at a tenth to a quarter of these bounds.
U = 2.0**-8
BF16_ROUNDINGS = {
    # q/k/v weights and outputs, rotary's tables and rotated q/k, SDPA's output, o_proj x 2
    "attention": 7,
    # q/k/v x 2, conv and norm weights, the float32 path's output, g_proj x 2, o_proj x 2
    "deltanet": 9,
    # deltanet's, and a_proj x 2, A_log and dt_bias into the float32 decay
    "gated_deltanet": 13,
    # in_proj x 2, short conv x 2, per order (3 at most) the skip weight, the float32 long
    # convolution's output and the gate's product, out_proj x 2; the filters are float32
    "hyena": 15,
    # deltanet's with g_a/g_b_proj x 4 (not 2), and f_a/f_b_proj x 4, A_log, dt_bias to the decay
    "kda": 17,
    # q/k/v x 2, rotary x 2, the feature map, the op's output, output norm x 2, gate x 2, o_proj x 2
    "linear_attention": 14,
    # q/k/v/control projections x 2, the float32 op's output, o_proj x 2
    "linformer": 5,
    # in_proj x 2, conv x 2, x_proj x 2, dt_proj x 2, the float32 scan's output, out_proj x 2
    "mamba": 11,
    # in_proj x 2, conv x 2, x * dt, the float32 op's output, + D x, gated norm x 2, out_proj x 2
    "mamba2": 12,
    # the longer of q's and the latent's paths (q_a_proj, q_a_layernorm, q_b_proj; kv_a_proj,
    # kv_a_layernorm, kv_b_proj) x 2, SDPA's or the float32 absorbed step's output, o_proj x 2
    "mla": 9,
    # q/k/v x 2, rotary x 2, the op's output, group norm x 2, gate x 3, o_proj x 2
    "retnet": 12,
    # token shift's interpolation x 3, k/v/r x 2, sigmoid, the float32 wkv's output, r * y,
    # output x 2
    "rwkv4": 10,
    # ddlerp (delta, the low-rank adapter's 2 products and tanh, the mix) x 7, r/k/v/g x 2,
    # the decay adapter x 3, the op's output, ln_x x 2, silu and gate x 2, output x 2
    "rwkv6": 20,
    # token shift's interpolation x 3, the gate adapter (g1, g2, their products, sigmoid) x 5,
    # the float32 path's output (adapters, value residual, op, ln_x, bonus, gate), output x 2
    "rwkv7": 11,
    # q/k/v x 2, rotary x 2, the feature map, the float32 op's output, o_proj x 2
    "window_linear_attention": 8,
}


def _bf16_tolerance(name: str) -> float:
    assert name in BF16_ROUNDINGS, (
        f"mixer {name!r} has no entry in BF16_ROUNDINGS: count the bf16 roundings on its path"
    )
    return BF16_ROUNDINGS[name] * U


def _assert_close_in_norm(name, reference, other, ratio):
    """|other - reference| / |reference| <= ratio, in the Frobenius norm (bf16's rounding
    errors are spread over every element; the max-abs ratio would measure its worst one)."""
    assert other.shape == reference.shape, f"{name}: shape {tuple(other.shape)}"
    assert torch.isfinite(other).all(), f"{name}: non-finite values"
    reference, other = reference.double(), other.double()
    err = ((other - reference).norm() / reference.norm()).item()
    assert err <= ratio, f"{name}: relative error {err:.3e} > {ratio:.1e}"


@pytest.mark.parametrize("name,options", CASES)
@torch.no_grad()
def test_bf16_output_is_bf16_and_close_to_float32(name, options):
    mixer = _mixer(name, options)
    low = copy.deepcopy(mixer).to(torch.bfloat16)
    x = torch.randn(2, 37, D_MODEL).bfloat16()
    y, _ = low(x)
    assert y.dtype == torch.bfloat16, f"{name}: bf16 input gives {y.dtype} output"
    want, _ = mixer(x.float())
    _assert_close_in_norm(f"{name} bf16 vs float32", want, y, _bf16_tolerance(name))


@pytest.mark.parametrize("name,options", CASES)
@torch.no_grad()
def test_bf16_chunk_and_step_consistency(name, options):
    # the two forms differ only in stages each computes its own way, so the bound holds
    mixer = _mixer(name, options).to(torch.bfloat16)
    x = torch.randn(2, 19, D_MODEL).bfloat16()
    whole, _ = mixer(x)
    split, _ = _run_split(mixer, x, [5, 11])
    stepped, _ = _run_split(mixer, x, list(range(1, 19)))
    assert split.dtype == stepped.dtype == torch.bfloat16
    _assert_close_in_norm(f"{name} bf16 split", whole, split, _bf16_tolerance(name))
    _assert_close_in_norm(f"{name} bf16 token by token", whole, stepped, _bf16_tolerance(name))


@pytest.mark.parametrize("name,options", CASES)
@torch.no_grad()
def test_init_state_equals_no_state(name, options):
    mixer = _mixer(name, options)
    x = torch.randn(3, 9, D_MODEL)
    y_none, _ = mixer(x)
    y_init, _ = mixer(x, mixer.init_state(3, x.device, x.dtype))
    assert_close(name, y_none, y_init, 1e-6)


@pytest.mark.parametrize("name,options", CASES)
@torch.no_grad()
def test_state_size_is_honest_and_grows_as_declared(name, options):
    mixer = _mixer(name, options)
    x = torch.randn(2, 37, D_MODEL)
    _, state = mixer(x)
    assert state.nbytes() == mixer.state_size(37), "state_size disagrees with the state held"
    small, large = mixer.state_size(1024), mixer.state_size(65536)
    if mixer.bounded:
        assert small == large, f"{name} declares a bounded state but it grows"
    elif getattr(mixer, "window", None) is None:
        assert large > small, f"{name} declares an unbounded state but it does not grow"


@pytest.mark.parametrize("name,options", CASES)
@torch.no_grad()
def test_bounded_state_holds_no_more_memory_after_a_longer_input(name, options):
    """A state that views its input (x[:, -1] of a prefill) keeps the whole input alive."""
    mixer = _mixer(name, options)
    if not mixer.bounded:
        return
    held = {}
    for T in (8, 96):
        _, state = mixer(torch.randn(2, T, D_MODEL))
        held[T] = sum(t.untyped_storage().nbytes() for t in state.tensors())
    assert held[96] == held[8], f"{name}: the state holds {held} bytes after 8 and 96 tokens"
    # and no more than its own tensors: a view into a larger buffer keeps all of it alive
    own = sum(t.numel() * t.element_size() for t in state.tensors())
    assert held[96] == own, f"{name}: the state's {own} bytes keep {held[96]} bytes alive"


@pytest.mark.parametrize("name,options", CASES)
def test_backward_reaches_every_parameter(name, options):
    mixer = _mixer(name, options).train()
    x = torch.randn(2, 11, D_MODEL, requires_grad=True)
    y, _ = mixer(x)
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    missing = [n for n, p in mixer.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: no gradient reaches {missing}"


@pytest.mark.parametrize("name", sorted(MIXERS))
@torch.no_grad()
def test_state_from_another_batch_size_is_refused(name):
    mixer = _mixer(name, {})
    _, state = mixer(torch.randn(2, 5, D_MODEL))
    with pytest.raises(ValueError, match="batch size"):
        mixer(torch.randn(3, 1, D_MODEL), state)


@dataclasses.dataclass
class ForeignState(MixerState):
    h: torch.Tensor


@pytest.mark.parametrize("name", sorted(MIXERS))
@torch.no_grad()
def test_state_from_another_mixer_is_refused(name):
    mixer = _mixer(name, {})
    with pytest.raises(TypeError, match="another mixer"):
        mixer(torch.randn(2, 1, D_MODEL), ForeignState(torch.zeros(2, 3)))


# The padding contract (layers/base.py): rows of different real lengths in one padded batch give,
# at their real positions, what each gives alone, and the returned state continues as the row's
# alone, for left and right padding, run whole, in chunks and token by token.
PADDED_LENGTHS = (11, 7, 4)


def _padded_batch(rows: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """rows (1, L_i, D) -> x (B, T, D) with random values at the padding (so a mixer that reads
    them is caught) and padding_mask (B, T), True at real tokens, padded on `side`."""
    T = max(row.shape[1] for row in rows)
    x = torch.randn(len(rows), T, D_MODEL, dtype=rows[0].dtype, device=rows[0].device)
    mask = torch.zeros(len(rows), T, dtype=torch.bool, device=rows[0].device)
    for i, row in enumerate(rows):
        L = row.shape[1]
        span = slice(T - L, T) if side == "left" else slice(0, L)
        x[i, span], mask[i, span] = row[0], True
    return x, mask


def _run_padded(mixer, x, mask, form):
    """The padded batch run whole, in three chunks, or token by token, the state carried."""
    cuts = {"whole": [], "chunks": [3, 8], "steps": list(range(1, x.shape[1]))}[form]
    state, outputs = None, []
    bounds = [0, *cuts, x.shape[1]]
    for start, end in zip(bounds[:-1], bounds[1:]):
        y, state = mixer(x[:, start:end], state, padding_mask=mask[:, start:end])
        outputs.append(y)
    return torch.cat(outputs, dim=1), state


def _continue(mixer, state, x):
    """x (B, 5, D) after `state`, without padding: three tokens at once, then two steps."""
    y3, state = mixer(x[:, :3], state)
    y4, state = mixer(x[:, 3:4], state)
    y5, _ = mixer(x[:, 4:5], state)
    return torch.cat([y3, y4, y5], dim=1)


def _float64_if_it_runs(mixer):
    """The mixer in float64 where all its paths take it (exactness shows best there), else
    float32 as built."""
    wide = copy.deepcopy(mixer).double()
    try:
        wide(torch.randn(1, 2, D_MODEL, dtype=torch.float64))
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return mixer, torch.float32
    return wide, torch.float64


@pytest.mark.parametrize("name,options", CASES)
@torch.no_grad()
def test_padded_rows_equal_rows_alone(name, options):
    mixer, dtype = _float64_if_it_runs(_mixer(name, options))
    _assert_padded_rows_equal_rows_alone(name, mixer, dtype)


def _assert_padded_rows_equal_rows_alone(name, mixer, dtype, device="cpu", ratio=1e-4,
                                         forms=("whole", "chunks", "steps")):
    generator = torch.Generator().manual_seed(5)
    rows = [torch.randn(1, L, D_MODEL, generator=generator, dtype=dtype).to(device)
            for L in PADDED_LENGTHS]
    after = torch.randn(len(rows), 5, D_MODEL, generator=generator, dtype=dtype).to(device)
    alone = []
    for i, row in enumerate(rows):
        y, state = mixer(row)
        alone.append((y, _continue(mixer, state, after[i : i + 1])))
    for side in ("left", "right"):
        x, mask = _padded_batch(rows, side)
        for form in forms:
            y, state = _run_padded(mixer, x, mask, form)
            assert torch.isfinite(y).all(), f"{name} {side}-padded {form}: non-finite output"
            continued = _continue(mixer, state, after)
            for i, (want, want_continued) in enumerate(alone):
                where = f"{name} {side}-padded {form}, row {i} ({PADDED_LENGTHS[i]} tokens)"
                assert_close(where, want[0], y[i][mask[i]], ratio)
                assert_close(f"{where} continued", want_continued[0], continued[i], ratio)


# the mixers that call zoo.kernels.linear_attention, with chunk sizes its Triton kernels take
LINEAR_ATTENTION_OP_CASES = [
    ("linear_attention", {"chunk_size": 16}),
    ("linear_attention", {"feature_map": "hedgehog", "n_heads": 4, "rope_theta": 500.0,
                          "feature_maps_after_rotary": False, "chunk_size": 16}),
    ("retnet", {"n_heads": 4, "chunk_size": 16}),
]


@pytest.mark.slow  # minutes through Triton's interpreter
@pytest.mark.parametrize("name,options", LINEAR_ATTENTION_OP_CASES)
@torch.no_grad()
def test_padded_rows_equal_rows_alone_on_the_triton_backend(name, options, device,
                                                            monkeypatch):
    # padding reaches the op as zero keys and per-step decays of 1: the Triton kernels (through
    # the interpreter without a GPU) must carry them as the PyTorch path does
    import functools
    import sys

    from zoo.kernels.linear_attention import linear_attention

    mixer = _mixer(name, options).to(device)
    monkeypatch.setattr(sys.modules[type(mixer).__module__], "linear_attention",
                        functools.partial(linear_attention, backend="triton"))
    # token by token is the kernels' T = 1 case, met again in the continuation's two steps
    _assert_padded_rows_equal_rows_alone(name, mixer, torch.float32, device, ratio=1e-3,
                                         forms=("whole", "chunks"))


@pytest.mark.parametrize("name", sorted(MIXERS))
@torch.no_grad()
def test_a_padding_mask_that_is_not_batch_by_time_bool_is_refused(name):
    # an integer attention_mask passed on as it is would broadcast and negate as numbers
    mixer = _mixer(name, {})
    x = torch.randn(2, 5, D_MODEL)
    for wrong in (torch.ones(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool)):
        with pytest.raises(ValueError, match="padding_mask must be a \\(B, T\\)"):
            mixer(x, padding_mask=wrong)
