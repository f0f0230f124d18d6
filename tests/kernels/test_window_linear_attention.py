import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from zoo.kernels import window_linear_attention
from zoo.kernels.window_linear_attention import WindowLinearAttentionState, empty_state
from zoo.testing import assert_close

BACKENDS = ["torch", "triton"]
CHUNK = 16  # small blocks keep Triton's interpreter fast and still cross block boundaries
# (B, T, H, D, W): odd T across blocks, T < W, T = 1, W = 1, a band reaching over a block
SHAPES = [(2, 37, 2, 8, 5), (1, 5, 2, 8, 9), (2, 1, 2, 8, 4), (2, 19, 1, 8, 1),
          (1, 40, 1, 16, 20)]
STATE_FIELDS = ("k", "v", "phi_k", "S", "z")


def _inputs(B, T, H, D, W, state, scale_form, Dv=None, F=6):
    """Leaf tensors (requires_grad) of one call: features and r non-negative, as the mixer's."""
    Dv = Dv or D
    inputs = {
        "q": torch.randn(B, T, H, D), "k": torch.randn(B, T, H, D), "v": torch.randn(B, T, H, Dv),
        "phi_q": torch.rand(B, T, H, F), "phi_k": torch.rand(B, T, H, F),
        "linear_scale": {"none": None, "head": torch.rand(H) + 0.5,
                         "batch": torch.rand(B, H) + 0.5}[scale_form],
    }
    if state != "none":
        # random tensors in the empty slots too: no path may let them reach anything
        inputs.update(k0=torch.randn(B, W, H, D), v0=torch.randn(B, W, H, Dv),
                      phi_k0=torch.rand(B, W, H, F), S0=torch.randn(B, H, F, Dv),
                      z0=torch.rand(B, H, F) * 4)
    filled = {"none": None, "partial": W // 2, "full": W}[state]
    return {n: t.requires_grad_() if t is not None else None for n, t in inputs.items()}, filled


def _call(inputs, filled, window, backend, dtype, **options):
    cast = {n: t.to(dtype) if t is not None else None for n, t in inputs.items()}
    state = None
    if filled is not None:
        state = WindowLinearAttentionState(*(cast[f + "0"] for f in STATE_FIELDS), filled)
    return window_linear_attention(
        cast["q"], cast["k"], cast["v"], cast["phi_q"], cast["phi_k"], window=window,
        linear_scale=cast["linear_scale"], initial_state=state, output_final_state=True,
        backend=backend, **options)


def _run_and_grads(inputs, filled, window, backend, dtype, do, dstate, **options):
    """o, the final state and the gradient of (o * do).sum() + sum_f (state.f * dstate_f).sum()
    for every input (zeros where none reaches it)."""
    leaves = {n: t for n, t in inputs.items() if t is not None}
    for t in leaves.values():
        t.grad = None
    o, state = _call(inputs, filled, window, backend, dtype, **options)
    loss = (o.double() * do).sum()
    for f in STATE_FIELDS:
        loss = loss + (getattr(state, f).double() * dstate[f]).sum()
    loss.backward()
    grads = {"d" + n: t.grad.clone() if t.grad is not None else torch.zeros_like(t)
             for n, t in leaves.items()}
    return o, state, grads


def _compare(inputs, filled, window, backend, ratio, grad_ratio, dtype=torch.float32):
    B, T, H, _ = inputs["q"].shape
    W, Dv, F = window, inputs["v"].shape[-1], inputs["phi_q"].shape[-1]
    do = torch.randn(B, T, H, Dv, dtype=torch.float64)
    dstate = {"k": torch.randn(B, W, H, inputs["q"].shape[-1]), "v": torch.randn(B, W, H, Dv),
              "phi_k": torch.randn(B, W, H, F), "S": torch.randn(B, H, F, Dv),
              "z": torch.randn(B, H, F)}
    dstate = {n: t.double() for n, t in dstate.items()}
    o_ref, state_ref, grads_ref = _run_and_grads(inputs, filled, W, "reference",
                                                 torch.float64, do, dstate)
    o, state, grads = _run_and_grads(inputs, filled, W, backend, dtype, do, dstate,
                                     chunk_size=CHUNK)
    assert o.dtype == dtype
    assert state.S.dtype == state.z.dtype == torch.float32, "S, z accumulate in float32"
    assert state.k.dtype == dtype, "the window keeps the inputs' dtype"
    assert state.filled == state_ref.filled == min((filled or 0) + T, W)
    assert_close("o", o_ref, o, ratio)
    for f in STATE_FIELDS:
        assert_close(f"final_state.{f}", getattr(state_ref, f), getattr(state, f), ratio)
    for name, ref in grads_ref.items():
        _assert_grad_close(name, ref, grads[name], grad_ratio)


def _assert_grad_close(name, reference, other, ratio):
    """assert_close, except for a gradient that vanishes (e.g. dq when each query sees only
    itself and no older token: numerator and denominator move together), where the reference
    holds only rounding noise to compare against: the other must vanish too."""
    if reference.abs().max() > 1e-12:
        assert_close(name, reference, other, ratio)
    else:
        assert other.abs().max() <= 1e-5, f"{name}: should vanish, max |{name}| = " \
            f"{other.abs().max():.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,T,H,D,W", SHAPES)
@pytest.mark.parametrize("state", ["none", "partial", "full"])
def test_matches_reference_forward_and_backward(backend, B, T, H, D, W, state):
    scale_form = ["none", "head", "batch"][(T + W) % 3]  # every form across the shapes
    inputs, filled = _inputs(B, T, H, D, W, state, scale_form)
    _compare(inputs, filled, W, backend, 2e-5, 5e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_dim_differs_from_key_dim(backend):
    inputs, filled = _inputs(2, 23, 2, 16, 6, "full", "head", Dv=8, F=32)
    _compare(inputs, filled, 6, backend, 2e-5, 5e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_close_to_reference(backend):
    inputs, filled = _inputs(2, 29, 2, 16, 7, "full", "head")
    _compare(inputs, filled, 7, backend, 3e-2, 5e-2, dtype=torch.bfloat16)


def _dense_definition(q, k, v, phi_q, phi_k, window, r):
    """The definition over absolute positions as (T, T) matrices, from an empty state."""
    T = q.shape[1]
    t = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    in_window = (j <= t) & (j > t - window)
    scores = q.shape[-1] ** -0.5 * torch.einsum("bthd,bshd->bhts", q, k)
    scores = scores.masked_fill(~in_window, -torch.inf)
    softmax_part = torch.exp(scores - scores.amax(-1, keepdim=True).detach())
    linear_part = torch.einsum("bthf,bshf->bhts", phi_q, phi_k) * (j <= t - window)
    weights = softmax_part + r[None, :, None, None] * linear_part
    o = torch.einsum("bhts,bshv->bhtv", weights, v) / weights.sum(-1, keepdim=True)
    return rearrange(o, "b h t v -> b t h v")


@pytest.mark.parametrize("window", [1, 4, 30])
def test_reference_matches_dense_definition_with_m_held_constant(window):
    B, T, H, D = 2, 23, 2, 8
    inputs, _ = _inputs(B, T, H, D, window, "none", "head")
    inputs = {n: t.detach().double().requires_grad_() for n, t in inputs.items()}
    args = [inputs[n] for n in ("q", "k", "v", "phi_q", "phi_k")]
    do = torch.randn(B, T, H, D, dtype=torch.float64)
    o_ref, _ = window_linear_attention(*args, window=window,
                                       linear_scale=inputs["linear_scale"], backend="reference")
    o = _dense_definition(*args, window, inputs["linear_scale"])
    assert_close("o", o, o_ref, 1e-12)
    leaves = list(inputs.values())
    # with the window over every token, phi_k reaches no output in either form
    grads_ref = torch.autograd.grad((o_ref * do).sum(), leaves, allow_unused=True)
    grads = torch.autograd.grad((o * do).sum(), leaves, allow_unused=True)
    for name, leaf, ref, got in zip(inputs, leaves, grads, grads_ref):
        ref = torch.zeros_like(leaf) if ref is None else ref
        got = torch.zeros_like(leaf) if got is None else got
        assert_close("d" + name, ref, got, 1e-12)


@pytest.mark.parametrize("window", [1, 5, 40])
@pytest.mark.parametrize("scale_shape", ["head", "batch"])
def test_attention_weights_are_rows_that_give_the_output(window, scale_shape):
    """window_linear_attention_weights: rows summing to 1 whose product with v is o, and
    gradients through them as through the op (what attention transfer's CE trains)."""
    from zoo.kernels.window_linear_attention import window_linear_attention_weights

    B, T, H, D = 2, 19, 3, 8
    inputs, _ = _inputs(B, T, H, D, window, "none", scale_shape)
    inputs = {n: t.detach().double().requires_grad_() for n, t in inputs.items()}
    q, k, v, phi_q, phi_k = (inputs[n] for n in ("q", "k", "v", "phi_q", "phi_k"))
    weights = window_linear_attention_weights(q, k, phi_q, phi_k, window,
                                              linear_scale=inputs["linear_scale"])
    assert weights.shape == (B, H, T, T)
    assert_close("rows", torch.ones(B, H, T, dtype=torch.float64), weights.sum(-1), 1e-12)
    assert torch.all(weights.triu(1) == 0)  # causal
    o_ref, _ = window_linear_attention(q, k, v, phi_q, phi_k, window=window,
                                       linear_scale=inputs["linear_scale"],
                                       backend="reference")
    o = torch.einsum("bhtj,bjhv->bthv", weights, v)
    assert_close("weights @ v", o_ref, o, 1e-12)
    do = torch.randn_like(o)
    leaves = [inputs[n] for n in ("q", "k", "phi_q", "phi_k", "linear_scale")]
    grads = torch.autograd.grad((o * do).sum(), leaves, allow_unused=True)
    grads_ref = torch.autograd.grad((o_ref * do).sum(), leaves, allow_unused=True)
    for name, got, ref in zip(("q", "k", "phi_q", "phi_k", "r"), grads, grads_ref):
        if ref is None:
            assert got is None or torch.all(got == 0), name
        else:
            assert_close("d" + name, ref, got, 1e-10)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@torch.no_grad()
def test_window_covering_everything_is_causal_softmax_attention(backend):
    B, T, H, D = 2, 21, 2, 8
    inputs, _ = _inputs(B, T, H, D, T, "none", "head")
    q, k, v, phi_q, phi_k = (inputs[n] for n in ("q", "k", "v", "phi_q", "phi_k"))
    expected = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)),
                                              is_causal=True).transpose(1, 2)
    for window in (T, T + 5):
        o, _ = window_linear_attention(q, k, v, phi_q, phi_k, window=window,
                                       linear_scale=inputs["linear_scale"], chunk_size=CHUNK,
                                       backend=backend)
        assert_close(f"o (window={window})", expected, o, 1e-5)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@torch.no_grad()
def test_zero_linear_scale_is_sliding_window_attention(backend):
    B, T, H, D, W = 2, 37, 2, 8, 6
    inputs, _ = _inputs(B, T, H, D, W, "none", "head")
    q, k, v, phi_q, phi_k = (inputs[n] for n in ("q", "k", "v", "phi_q", "phi_k"))
    t, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    band = (j <= t) & (j > t - W)
    expected = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)),
                                              attn_mask=band).transpose(1, 2)
    o, _ = window_linear_attention(q, k, v, phi_q, phi_k, window=W,
                                   linear_scale=torch.zeros(H), chunk_size=CHUNK,
                                   backend=backend)
    assert_close("o", expected, o, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("W", [1, 5, 30])
@torch.no_grad()
def test_whole_split_and_token_by_token_agree(backend, W):
    B, T, H, D = 2, CHUNK + 9, 2, 8
    inputs, _ = _inputs(B, T, H, D, W, "none", "batch")
    args = [inputs[n] for n in ("q", "k", "v", "phi_q", "phi_k")]
    options = dict(window=W, linear_scale=inputs["linear_scale"], chunk_size=CHUNK,
                   backend=backend, output_final_state=True)

    def run(bounds):
        outputs, state = [], None
        for a, b in zip(bounds[:-1], bounds[1:]):
            o, state = window_linear_attention(*(x[:, a:b] for x in args),
                                               initial_state=state, **options)
            outputs.append(o)
        return torch.cat(outputs, 1), state

    whole, whole_state = run([0, T])
    # the interpreter is slow per launch: Triton's kernels go token by token over the last few
    first_step = 1 if backend == "torch" else T - 6
    for bounds in ([0, 3, 4, CHUNK + 2, T], [0, *range(first_step, T + 1)]):
        split, state = run(bounds)
        what = f"split at {bounds[1:-1]}" if len(bounds) == 5 else "token by token"
        assert_close(f"o {what}", whole, split, 1e-5)
        assert state.filled == whole_state.filled == min(T, W)
        for f in STATE_FIELDS:
            assert_close(f"final_state.{f} {what}", getattr(whole_state, f),
                         getattr(state, f), 1e-5)


@torch.no_grad()
def test_chunk_size_does_not_change_the_result():
    inputs, filled = _inputs(2, 45, 2, 8, 7, "partial", "head")
    o1, s1 = _call(inputs, filled, 7, "torch", torch.float32, chunk_size=16)
    o2, s2 = _call(inputs, filled, 7, "torch", torch.float32, chunk_size=5)
    assert_close("o", o1, o2, 1e-5)
    for f in STATE_FIELDS:
        assert_close(f"final_state.{f}", getattr(s1, f), getattr(s2, f), 1e-5)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("T", [1, 30])
@torch.no_grad()
def test_final_state_owns_its_memory(backend, T):
    """A view into the context or the linear memory would keep all of it alive."""
    inputs, filled = _inputs(1, T, 1, 8, 4, "full", "head")
    _, state = _call(inputs, filled, 4, backend, torch.float32, chunk_size=CHUNK)
    for f in STATE_FIELDS:
        t = getattr(state, f)
        assert t.is_contiguous(), f
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), f


def test_empty_state_equals_no_state():
    inputs, _ = _inputs(2, 9, 2, 8, 4, "none", "head")
    args = [inputs[n].detach() for n in ("q", "k", "v", "phi_q", "phi_k")]
    o1, s1 = window_linear_attention(*args, window=4, output_final_state=True)
    empty = empty_state(2, 4, 2, 8, 8, 6)
    o2, s2 = window_linear_attention(*args, window=4, initial_state=empty,
                                     output_final_state=True)
    assert_close("o", o1, o2, 0.0)
    for f in STATE_FIELDS:
        assert_close(f"final_state.{f}", getattr(s1, f), getattr(s2, f), 0.0)


def test_bad_inputs_name_the_argument():
    B, T, H, D = 2, 5, 3, 8
    q, v, f = torch.randn(B, T, H, D), torch.randn(B, T, H, 4), torch.rand(B, T, H, 6)
    call = lambda *args, **kw: window_linear_attention(*args, **{"window": 3, **kw})
    with pytest.raises(ValueError, match="q must be"):
        call(q[0], q, v, f, f)
    with pytest.raises(ValueError, match="k must match"):
        call(q, torch.randn(B, T, 1, D), v, f, f)
    with pytest.raises(ValueError, match="v must be"):
        call(q, q, torch.randn(B, T + 1, H, 4), f, f)
    with pytest.raises(ValueError, match="phi_q must be"):
        call(q, q, v, torch.rand(B, T, 2, 6), f)
    with pytest.raises(ValueError, match="phi_k must match"):
        call(q, q, v, f, torch.rand(B, T, H, 7))
    for window in (0, -2, 2.5, True, None):
        with pytest.raises(ValueError, match=f"window must be an int >= 1.*got {window!r}"):
            call(q, q, v, f, f, window=window)
    with pytest.raises(ValueError, match="linear_scale must be None, \\(H,\\)"):
        call(q, q, v, f, f, linear_scale=torch.ones(H, 1))
    with pytest.raises(ValueError, match="linear_scale must be >= 0"):
        call(q, q, v, f, f, linear_scale=-torch.ones(H))
    with pytest.raises(ValueError, match="chunk_size"):
        call(q, q, v, f, f, chunk_size=0)
    with pytest.raises(ValueError, match="backend"):
        call(q, q, v, f, f, backend="cuda")
    with pytest.raises(TypeError, match="initial_state must be a WindowLinearAttentionState"):
        call(q, q, v, f, f, initial_state=(q, q))
    state = empty_state(B, 4, H, D, 4, 6)  # built for window 4
    with pytest.raises(ValueError, match="initial_state.k must be .* for window=3"):
        call(q, q, v, f, f, initial_state=state)
    state = empty_state(B, 3, H, D, 4, 6)._replace(filled=4)
    with pytest.raises(ValueError, match="initial_state.filled must be in 0..window=3"):
        call(q, q, v, f, f, initial_state=state)
    with pytest.raises(ValueError, match="chunk_size a power of two"):
        call(q, q, v, f, f, chunk_size=24, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("W", [1, 64, 200])
def test_cuda_triton_matches_reference(W):
    B, T, H, D = 2, 300, 4, 64
    inputs, filled = _inputs(B, T, H, D, W, "partial", "head", F=128)
    inputs = {n: t.detach().cuda().requires_grad_() for n, t in inputs.items()}
    do = torch.randn(B, T, H, D, device="cuda", dtype=torch.float64)
    dstate = {"k": torch.randn(B, W, H, D), "v": torch.randn(B, W, H, D),
              "phi_k": torch.randn(B, W, H, 128), "S": torch.randn(B, H, 128, D),
              "z": torch.randn(B, H, 128)}
    dstate = {n: t.double().cuda() for n, t in dstate.items()}
    o_ref, state_ref, grads_ref = _run_and_grads(inputs, filled, W, "reference",
                                                 torch.float64, do, dstate)
    o, state, grads = _run_and_grads(inputs, filled, W, "triton", torch.float32, do, dstate)
    assert_close("o", o_ref, o, 1e-4)
    for f in STATE_FIELDS:
        assert_close(f"final_state.{f}", getattr(state_ref, f), getattr(state, f), 1e-4)
    for name, ref in grads_ref.items():
        _assert_grad_close(name, ref, grads[name], 1e-4)
