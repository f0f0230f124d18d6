import pytest
import torch

from zoo.kernels import linear_attention
from zoo.kernels.linear_attention import linear_attention_recurrent
from zoo.testing import assert_close

BACKENDS = ["torch", "triton"]
DECAY_FORMS = ["none", "head", "step", "channel"]
CHUNK = 16  # small chunks keep Triton's interpreter fast and still cross chunk boundaries


def _decay(form, B, T, H, K, strength=1.0):
    """Log-decays <= 0 of the given form, varied enough that each position weighs differently."""
    shape = {"none": None, "head": (H,), "step": (B, T, H), "channel": (B, T, H, K)}[form]
    if shape is None:
        return None
    return torch.nn.functional.logsigmoid(torch.randn(shape) + 2.0) * strength


def _inputs(B, T, H, K, V, form, with_bonus, with_state, normalize=False, strength=1.0):
    if normalize:  # positive features, as a feature map would give
        q, k = torch.rand(B, T, H, K) + 0.1, torch.rand(B, T, H, K) + 0.1
    else:
        q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
    inputs = {
        "q": q, "k": k, "v": torch.randn(B, T, H, V),
        "decay": _decay(form, B, T, H, K, strength),
        "bonus": torch.randn(H, K) if with_bonus else None,
        "initial_state": (torch.rand if normalize else torch.randn)(B, H, K, V + normalize)
        if with_state else None,
    }
    return {name: t.requires_grad_() if t is not None else None for name, t in inputs.items()}


def _run_and_grads(inputs, backend, dtype, do, dht, **options):
    """o, final state and the gradient of (o * do).sum() + (ht * dht).sum() for every input."""
    leaves = {name: t for name, t in inputs.items() if t is not None}
    for t in leaves.values():
        t.grad = None
    cast = {name: t.to(dtype) if t is not None else None for name, t in inputs.items()}
    o, ht = linear_attention(cast.pop("q"), cast.pop("k"), cast.pop("v"), **cast,
                             output_final_state=True, backend=backend, **options)
    ((o.double() * do.double()).sum() + (ht.double() * dht.double()).sum()).backward()
    grads = {"d" + name: t.grad.clone() for name, t in leaves.items()}
    return o, ht, grads


def _upstream(inputs, normalize=False):
    """Random gradients of the loss with respect to o and to the final state."""
    B, T, H, K = inputs["q"].shape
    V = inputs["v"].shape[-1]
    return torch.randn(B, T, H, V), torch.randn(B, H, K, V + normalize)


def _compare(inputs, backend, ratio, dtype=torch.float32, grad_ratio=None, upstream=None,
             grad_ratios=None, **options):
    do, dht = upstream or _upstream(inputs, options.get("normalize", False))
    o_ref, ht_ref, grads_ref = _run_and_grads(inputs, "reference", torch.float64, do, dht,
                                              **options)
    o, ht, grads = _run_and_grads(inputs, backend, dtype, do, dht, chunk_size=CHUNK, **options)
    assert o.dtype == dtype
    assert ht.dtype == torch.float32, "the state accumulates in float32 whatever the inputs"
    assert_close("o", o_ref, o, ratio)
    assert_close("final_state", ht_ref, ht, ratio)
    for name, ref in grads_ref.items():
        assert_close(name, ref, grads[name], (grad_ratios or {}).get(name, grad_ratio or ratio))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,T", [(1, 1), (2, 7), (2, CHUNK + 1), (1, 2 * CHUNK + 3)])
@pytest.mark.parametrize("form", DECAY_FORMS)
@pytest.mark.parametrize("with_bonus", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_reference_forward_and_backward(backend, B, T, form, with_bonus, with_state):
    inputs = _inputs(B, T, 2, 16, 16, form, with_bonus, with_state)
    _compare(inputs, backend, 2e-5, grad_ratio=5e-5, scale=0.25)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", DECAY_FORMS)
@pytest.mark.parametrize("with_bonus", [False, True])
@pytest.mark.parametrize("B,T,with_state", [(1, 1, True), (2, CHUNK + 5, True),
                                            (1, CHUNK + 5, False)])
def test_normalized_matches_reference(backend, form, with_bonus, B, T, with_state):
    inputs = _inputs(B, T, 2, 16, 16, form, with_bonus, with_state, normalize=True)
    _compare(inputs, backend, 2e-5, grad_ratio=5e-5, normalize=True, scale=0.25)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["head", "channel"])
def test_bf16_close_to_reference(backend, form):
    inputs = _inputs(2, CHUNK + 9, 2, 16, 16, form, form == "channel", True)
    _compare(inputs, backend, 3e-2, dtype=torch.bfloat16, scale=0.25)


FLOAT32_ROUNDOFF = 2.0**-24


def _head_decay_gradient_tolerance(inputs, upstream, **options):
    """The relative error float32 allows in the gradient of a per-head decay (H,).

    Within a chunk the kernels weigh position s at t by exp(G_t - G_s), G a float32 cumulative sum
    of up to CHUNK log-decays: each sum's rounding grows as sqrt(CHUNK) u |G| (u the unit
    roundoff, |G| <= CHUNK max|g|), so a weight, and a position's gradient, carries a relative
    error up to 2 sqrt(CHUNK) u CHUNK max|g|. The per-head gradient sums those over (B, T); where
    they cancel, its relative error is that much larger: kappa = sum |g_t| / |sum g_t|, measured
    on the float64 reference with the decay spread to one value per position.
    """
    per_position = inputs["decay"].detach().double().expand(inputs["q"].shape[:3]).clone()
    per_position.requires_grad_()
    cast = {name: t.detach().double() for name, t in inputs.items() if t is not None}
    cast["decay"] = per_position
    o, ht = linear_attention(cast.pop("q"), cast.pop("k"), cast.pop("v"), **cast,
                             output_final_state=True, backend="reference", **options)
    do, dht = upstream
    ((o * do.double()).sum() + (ht * dht.double()).sum()).backward()
    g = per_position.grad
    kappa = float(g.abs().sum((0, 1)).max() / g.sum((0, 1)).abs().max())
    max_exponent = CHUNK * float(inputs["decay"].detach().abs().max())
    return kappa * 2 * CHUNK**0.5 * FLOAT32_ROUNDOFF * max_exponent


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["head", "step", "channel"])
@pytest.mark.parametrize("with_bonus", [False, True])
def test_strong_decay_long_sequence_is_finite_and_exact(backend, form, with_bonus):
    # g down to -30 per step: exp(-G) over a chunk is far beyond float32's range, so any
    # factorised exp(G_t) * exp(-G_s) would give inf / NaN here. Exponents G_t - G_s reach a few
    # hundred, so weights carry ~1e-5 of float32 rounding (hence 1e-4 for o, the state and the
    # per-position gradients); a per-head decay's gradient is a sum with cancellation, and gets
    # the tolerance derived from its inputs.
    inputs = _inputs(1, 5 * CHUNK + 5, 2, 16, 16, form, with_bonus, True, strength=15.0)
    upstream = _upstream(inputs)
    grad_ratios = None
    if form == "head":
        grad_ratios = {"ddecay": max(1e-4, _head_decay_gradient_tolerance(inputs, upstream,
                                                                            scale=0.25))}
    _compare(inputs, backend, 1e-4, upstream=upstream, grad_ratios=grad_ratios, scale=0.25)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["step", "channel"])
def test_gates_of_exactly_zero_are_finite(backend, form):
    # log-decay -inf (a gate of 0, e.g. Mamba-2's dt * A overflowing) resets the state
    inputs = _inputs(2, CHUNK + 7, 2, 16, 16, form, True, True)
    with torch.no_grad():
        inputs["decay"][:, 3] = -torch.inf
        inputs["decay"][:, CHUNK + 2] = -torch.inf
    _compare(inputs, backend, 2e-5, grad_ratio=5e-5, scale=0.25)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", DECAY_FORMS)
@pytest.mark.parametrize("normalize", [False, True])
def test_split_with_carried_state_equals_whole(backend, form, normalize):
    inputs = _inputs(2, 2 * CHUNK + 3, 2, 16, 16, form, form == "channel", False, normalize)
    q, k, v, decay, bonus = (inputs[n] for n in ("q", "k", "v", "decay", "bonus"))
    options = dict(bonus=bonus, normalize=normalize, chunk_size=CHUNK, backend=backend)

    def part(a, b, state):
        d = decay if decay is None or decay.dim() == 1 else decay[:, a:b]
        return linear_attention(q[:, a:b], k[:, a:b], v[:, a:b], decay=d, initial_state=state,
                                output_final_state=True, **options)

    whole, whole_state = part(0, None, None)
    pieces, state = [], None
    for a, b in [(0, 5), (5, 6), (6, CHUNK + 2), (CHUNK + 2, None)]:
        o, state = part(a, b, state)
        pieces.append(o)
    assert_close("o", whole, torch.cat(pieces, 1), 1e-5)
    assert_close("final_state", whole_state, state, 1e-5)


def test_chunk_size_does_not_change_the_result():
    inputs = _inputs(2, 45, 2, 8, 8, "channel", True, True)
    cast = {n: t.detach() if t is not None else None for n, t in inputs.items()}
    q, k, v = cast.pop("q"), cast.pop("k"), cast.pop("v")
    o1, h1 = linear_attention(q, k, v, **cast, output_final_state=True, chunk_size=16,
                              backend="torch")
    o2, h2 = linear_attention(q, k, v, **cast, output_final_state=True, chunk_size=40,
                              backend="torch")
    assert_close("o", o1, o2, 1e-5)
    assert_close("final_state", h1, h2, 1e-5)


def test_bad_inputs_name_the_argument():
    q, v = torch.randn(2, 5, 3, 8), torch.randn(2, 5, 3, 4)
    with pytest.raises(ValueError, match="k must"):
        linear_attention(q, torch.randn(2, 5, 3, 7), v)
    with pytest.raises(ValueError, match="v must"):
        linear_attention(q, q, torch.randn(2, 6, 3, 4))
    with pytest.raises(ValueError, match="decay must"):
        linear_attention(q, q, v, decay=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="decay is a log-decay"):
        linear_attention(q, q, v, decay=torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="bonus"):
        linear_attention(q, q, v, bonus=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="initial_state"):
        linear_attention(q, q, v, initial_state=torch.zeros(2, 3, 8, 4), normalize=True)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_attention(q, q, v, chunk_size=0)
    with pytest.raises(ValueError, match="backend"):
        linear_attention(q, q, v, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("form", DECAY_FORMS)
def test_cuda_auto_backend_matches_reference(form):
    B, T, H, K, V = 2, 300, 4, 64, 64
    inputs = _inputs(B, T, H, K, V, form, form == "channel", True)
    cuda = {n: t.detach().cuda().requires_grad_() if t is not None else None
            for n, t in inputs.items()}
    do, dht = torch.randn(B, T, H, V, device="cuda"), torch.randn(B, H, K, V, device="cuda")
    o_ref, ht_ref, grads_ref = _run_and_grads(cuda, "reference", torch.float64, do, dht,
                                              scale=K**-0.5)
    o, ht, grads = _run_and_grads(cuda, "auto", torch.float32, do, dht, scale=K**-0.5)
    assert_close("o", o_ref, o, 1e-4)
    assert_close("final_state", ht_ref, ht, 1e-4)
    for name, ref in grads_ref.items():
        assert_close(name, ref, grads[name], 1e-4)


def test_triton_limits_are_clear_errors():
    q, v = torch.randn(1, 5, 1, 8), torch.randn(1, 5, 1, 4)
    with pytest.raises(ValueError, match="chunk_size a power of two"):
        linear_attention(q, q, v, chunk_size=24, backend="triton")
    big = torch.randn(1, 5, 1, 300)
    with pytest.raises(ValueError, match="K <= 256"):
        linear_attention(big, big, v, backend="triton")


def _token(decay, t):
    """The decay of token t alone: (H,) applies to every token, the others are sliced."""
    return decay if decay is None or decay.dim() == 1 else decay[:, t : t + 1]


@pytest.mark.parametrize("form", DECAY_FORMS)
@pytest.mark.parametrize("with_bonus", [False, True])
def test_recurrent_token_by_token_matches_reference(form, with_bonus):
    B, T, H, K, V = 2, 9, 2, 16, 8
    inputs = _inputs(B, T, H, K, V, form, with_bonus, with_state=True)
    q, k, v, decay, bonus, h0 = (inputs[n] for n in
                                 ("q", "k", "v", "decay", "bonus", "initial_state"))
    do, dht = torch.randn(B, T, H, V), torch.randn(B, H, K, V)
    leaves = [t for t in (q, k, v, decay, bonus, h0) if t is not None]

    o_ref, ht_ref = linear_attention(
        q.double(), k.double(), v.double(), decay=None if decay is None else decay.double(),
        bonus=None if bonus is None else bonus.double(), scale=0.25, initial_state=h0.double(),
        output_final_state=True, backend="reference")
    ((o_ref * do.double()).sum() + (ht_ref * dht.double()).sum()).backward()
    grads_ref = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None

    outputs, state = [], h0
    for t in range(T):
        o_t, state = linear_attention_recurrent(
            q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], _token(decay, t), bonus, 0.25,
            state, output_final_state=True)
        outputs.append(o_t)
    o = torch.cat(outputs, 1)
    ((o * do).sum() + (state * dht).sum()).backward()
    assert o.dtype == torch.float32 and state.dtype == torch.float32
    assert_close("o", o_ref, o, 2e-5)
    assert_close("final_state", ht_ref, state, 2e-5)
    for name, ref, t in zip(["dq", "dk", "dv", "ddecay", "dbonus", "dh0"],
                            grads_ref, leaves):
        assert_close(name, ref, t.grad, 5e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_one_token_on_the_torch_path_is_the_recurrent_form(normalize):
    inputs = _inputs(2, 1, 2, 8, 8, "channel", True, True, normalize)
    q, k, v, decay, bonus, h0 = (inputs[n].detach() for n in
                                 ("q", "k", "v", "decay", "bonus", "initial_state"))
    o, ht = linear_attention(q, k, v, decay=decay, bonus=bonus, normalize=normalize,
                             initial_state=h0, output_final_state=True, backend="torch")
    if normalize:  # the public function's ones column, as it builds it
        v = torch.cat([v, torch.ones_like(v[..., :1])], -1)
    num, state = linear_attention_recurrent(q, k, v, decay, bonus, 1.0, h0, True)
    expected = num[..., :-1] / (num[..., -1:] + 1e-6) if normalize else num
    assert torch.equal(o, expected) and torch.equal(ht, state)


def test_recurrent_form_takes_one_token():
    q = torch.randn(1, 3, 2, 4)
    with pytest.raises(ValueError, match=r"linear_attention_recurrent: takes one token .* T = 3"):
        linear_attention_recurrent(q, q, q)
