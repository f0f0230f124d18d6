import math

import pytest
import torch
import torch.nn.functional as F

from zoo.kernels import delta_rule, generalized_delta_rule
from zoo.kernels.delta_rule import delta_rule_recurrent, generalized_delta_rule_recurrent
from zoo.testing import assert_close

BACKENDS = ["torch", "triton"]
DECAY_FORMS = ["none", "step", "channel"]
CHUNK = 16  # small chunks keep Triton's interpreter fast and still cross chunk boundaries
LENGTHS = [(1, 1), (2, 7), (2, CHUNK + 3), (1, 2 * CHUNK + 5)]  # (B, T)


def _decay(form, B, T, H, K):
    """Log-decays <= 0 of the given form, varied enough that each position weighs differently."""
    shape = {"none": None, "step": (B, T, H), "channel": (B, T, H, K)}[form]
    if shape is None:
        return None
    return F.logsigmoid(torch.randn(shape) + 2.0)


def _inputs(B, T, H, K, V, form, with_state):
    """Leaves that require gradients: unit keys (as every delta-rule model feeds them), beta
    uniform in [0, 2] (2 allows the reflections of DeltaNet with negative eigenvalues)."""
    inputs = {
        "q": torch.randn(B, T, H, K),
        "k": F.normalize(torch.randn(B, T, H, K), dim=-1),
        "v": torch.randn(B, T, H, V),
        "beta": 2 * torch.rand(B, T, H),
        "decay": _decay(form, B, T, H, K),
        "initial_state": torch.randn(B, H, K, V) if with_state else None,
    }
    return {name: t.requires_grad_() if t is not None else None for name, t in inputs.items()}


def _run_and_grads(inputs, backend, dtype, do, dht, **options):
    """o, final state and the gradient of (o * do).sum() + (ht * dht).sum() for every input."""
    leaves = {name: t for name, t in inputs.items() if t is not None}
    for t in leaves.values():
        t.grad = None
    cast = {name: t.to(dtype) if t is not None else None for name, t in inputs.items()}
    o, ht = delta_rule(cast.pop("q"), cast.pop("k"), cast.pop("v"), cast.pop("beta"), **cast,
                       output_final_state=True, backend=backend, **options)
    ((o.double() * do.double()).sum() + (ht.double() * dht.double()).sum()).backward()
    grads = {"d" + name: t.grad.clone() for name, t in leaves.items()}
    return o, ht, grads


def _upstream(inputs):
    """Random gradients of the loss with respect to o and to the final state."""
    B, T, H, K = inputs["q"].shape
    V = inputs["v"].shape[-1]
    return torch.randn(B, T, H, V), torch.randn(B, H, K, V)


def _compare(inputs, backend, ratio, dtype=torch.float32, grad_ratio=None, **options):
    do, dht = _upstream(inputs)
    o_ref, ht_ref, grads_ref = _run_and_grads(inputs, "reference", torch.float64, do, dht,
                                              **options)
    o, ht, grads = _run_and_grads(inputs, backend, dtype, do, dht, chunk_size=CHUNK, **options)
    assert o.dtype == dtype
    assert ht.dtype == torch.float32, "the state accumulates in float32 whatever the inputs"
    assert_close("o", o_ref, o, ratio)
    assert_close("final_state", ht_ref, ht, ratio)
    assert set(grads) == set(grads_ref)
    for name, ref in grads_ref.items():
        assert_close(name, ref, grads[name], grad_ratio or ratio)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,T", LENGTHS)
@pytest.mark.parametrize("form", DECAY_FORMS)
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_reference_forward_and_backward(backend, B, T, form, with_state):
    inputs = _inputs(B, T, 2, 12, 10, form, with_state)
    _compare(inputs, backend, 2e-5, grad_ratio=5e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_value_blocks_match_reference(backend):
    # V = 80 > the Triton kernel's block of 64 value columns: dq, dk, dbeta and dg are sums of
    # per-block partials
    inputs = _inputs(1, CHUNK + 3, 2, 12, 80, "channel", True)
    _compare(inputs, backend, 2e-5, grad_ratio=5e-5)


def _naive_recurrence(q, k, v, beta, g, scale, h0):
    """fla's naive form, written apart from reference.py: decay, read, correct, write, read."""
    B, T, H, K = q.shape
    h = h0.clone()
    o = torch.zeros(B, T, H, v.shape[-1], dtype=q.dtype)
    for t in range(T):
        if g is not None:
            h = h * (g[:, t].exp()[..., None, None] if g.dim() == 3 else g[:, t].exp()[..., None])
        v_old = (h * k[:, t, :, :, None]).sum(-2)
        v_new = (v[:, t] - v_old) * beta[:, t, :, None]
        h = h + k[:, t, :, :, None] * v_new[:, :, None, :]
        o[:, t] = (h * (q[:, t] * scale)[..., None]).sum(-2)
    return o, h


@pytest.mark.parametrize("form", DECAY_FORMS)
def test_naive_recurrence_matches_reference(form):
    inputs = _inputs(2, 2 * CHUNK + 5, 3, 8, 6, form, True)
    q, k, v, beta, g, h0 = (None if t is None else t.detach().double() for t in inputs.values())
    o_naive, h_naive = _naive_recurrence(q, k, v, beta, g, 0.5, h0)
    o, ht = delta_rule(q, k, v, beta, decay=g, scale=0.5, initial_state=h0,
                       output_final_state=True, backend="reference")
    assert o.dtype == ht.dtype == torch.float64
    assert_close("o", o_naive, o, 1e-12)
    assert_close("final_state", h_naive, ht, 1e-12)


def _token(x, t):
    return None if x is None else x[:, t : t + 1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", DECAY_FORMS)
def test_whole_equals_pieces_with_carried_state_equals_token_by_token(backend, form):
    B, T = 2, 2 * CHUNK + 3
    inputs = _inputs(B, T, 2, 12, 10, form, True)
    q, k, v, beta, decay, h0 = (None if t is None else t.detach() for t in inputs.values())

    def run(a, b, state, **options):
        return delta_rule(q[:, a:b], k[:, a:b], v[:, a:b], beta[:, a:b],
                          decay=None if decay is None else decay[:, a:b], initial_state=state,
                          output_final_state=True, chunk_size=CHUNK, **options)

    whole, whole_state = run(0, T, h0, backend=backend)
    pieces, state = [], h0
    for a, b in [(0, 5), (5, 6), (6, CHUNK + 2), (CHUNK + 2, T)]:
        o, state = run(a, b, state, backend=backend)
        pieces.append(o)
    assert_close("o pieces", whole, torch.cat(pieces, 1), 1e-5)
    assert_close("final_state pieces", whole_state, state, 1e-5)

    steps, state = [], h0
    for t in range(T):
        o, state = delta_rule_recurrent(_token(q, t), _token(k, t), _token(v, t),
                                        _token(beta, t), _token(decay, t), 12**-0.5, state,
                                        output_final_state=True)
        steps.append(o)
    assert_close("o token by token", whole, torch.cat(steps, 1), 1e-5)
    assert_close("final_state token by token", whole_state, state, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["step", "channel"])
def test_strong_decay_is_finite_and_exact(backend, form):
    # g down to -20 per step: over a chunk exp(-G) would reach exp(100) and more, past
    # float32's range, so any factorised exp(G_i) * exp(-G_j) would give inf / NaN here. The
    # chunked form's G is a float32 sum whose rounding grows with |G|; at most 2e-6 is seen.
    inputs = _inputs(1, 2 * CHUNK + 5, 2, 12, 10, form, True)
    with torch.no_grad():  # from about 0 down to -20, weak and strong gates side by side
        inputs["decay"].copy_(-20 * torch.rand(inputs["decay"].shape) ** 2)
    assert inputs["decay"].min() < -19
    _compare(inputs, backend, 2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["step", "channel"])
def test_gates_of_exactly_zero_are_finite(backend, form):
    # log-decay -inf (a gate of 0) resets the state
    inputs = _inputs(2, CHUNK + 7, 2, 12, 10, form, True)
    with torch.no_grad():
        inputs["decay"][:, 3] = -torch.inf
        inputs["decay"][:, CHUNK + 2] = -torch.inf
    _compare(inputs, backend, 2e-5, grad_ratio=5e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_beta_at_the_ends_of_its_range(backend):
    # beta = 2 with a unit key is a reflection (I - 2 k k^T), beta = 0 skips the token
    inputs = _inputs(2, CHUNK + 5, 2, 12, 10, "none", True)
    with torch.no_grad():
        inputs["beta"].copy_(torch.tensor([0.0, 2.0, 1.0])[torch.randint(3, (2, CHUNK + 5, 2))])
    _compare(inputs, backend, 2e-5, grad_ratio=5e-5)


def test_beta_zero_leaves_the_state_untouched():
    inputs = _inputs(1, 9, 2, 8, 6, "channel", True)
    q, k, v, beta, decay, h0 = (t.detach() for t in inputs.values())
    beta[:, 4] = 0.0
    decay[:, 4] = 0.0
    _, state = delta_rule(q, k, v, beta, decay=decay, initial_state=h0, output_final_state=True,
                          backend="reference")
    keep = [t for t in range(9) if t != 4]
    _, without = delta_rule(q[:, keep], k[:, keep], v[:, keep], beta[:, keep],
                            decay=decay[:, keep], initial_state=h0, output_final_state=True,
                            backend="reference")
    assert_close("final_state", without, state, 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["step", "channel"])
def test_bf16_close_to_reference(backend, form):
    inputs = _inputs(2, CHUNK + 9, 2, 12, 10, form, True)
    _compare(inputs, backend, 3e-2, dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_float64_inputs_keep_a_float64_state(backend):
    inputs = _inputs(1, 5, 2, 8, 6, "step", True)
    q, k, v, beta, decay, h0 = (t.detach().double() for t in inputs.values())
    o, ht = delta_rule(q, k, v, beta, decay=decay, initial_state=h0, output_final_state=True,
                       backend=backend)
    o_ref, ht_ref = delta_rule(q, k, v, beta, decay=decay, initial_state=h0,
                               output_final_state=True, backend="reference")
    assert o.dtype == ht.dtype == torch.float64
    assert_close("o", o_ref, o, 1e-5)
    assert_close("final_state", ht_ref, ht, 1e-5)


def test_default_scale_is_inverse_sqrt_key_dim():
    inputs = _inputs(1, 6, 2, 8, 6, "step", False)
    q, k, v, beta, decay, _ = (t.detach() if t is not None else None for t in inputs.values())
    o, _ = delta_rule(q, k, v, beta, decay=decay, backend="reference")
    o_scaled, _ = delta_rule(q, k, v, beta, decay=decay, scale=8**-0.5, backend="reference")
    o_one, _ = delta_rule(q, k, v, beta, decay=decay, scale=1.0, backend="reference")
    assert torch.equal(o, o_scaled)
    assert not torch.allclose(o, o_one)


def test_chunk_size_does_not_change_the_result():
    inputs = _inputs(2, 45, 2, 8, 8, "channel", True)
    q, k, v, beta, decay, h0 = (t.detach() for t in inputs.values())
    results = [delta_rule(q, k, v, beta, decay=decay, initial_state=h0, output_final_state=True,
                          chunk_size=chunk, backend="torch") for chunk in (7, 16, 64)]
    for o, ht in results[1:]:
        assert_close("o", results[0][0], o, 1e-5)
        assert_close("final_state", results[0][1], ht, 1e-5)


def test_one_token_on_the_torch_path_is_the_recurrent_form():
    inputs = _inputs(2, 1, 2, 8, 8, "channel", True)
    q, k, v, beta, decay, h0 = (t.detach() for t in inputs.values())
    o, ht = delta_rule(q, k, v, beta, decay=decay, initial_state=h0, output_final_state=True,
                       backend="torch")
    o_step, state = delta_rule_recurrent(q, k, v, beta, decay, 8**-0.5, h0, True)
    assert torch.equal(o, o_step) and torch.equal(ht, state)


def test_recurrent_form_takes_one_token():
    q = torch.randn(1, 3, 2, 4)
    with pytest.raises(ValueError, match=r"delta_rule_recurrent: takes one token .* T = 3"):
        delta_rule_recurrent(q, q, q, torch.rand(1, 3, 2))


def test_bad_inputs_name_the_argument():
    q, v, beta = torch.randn(2, 5, 3, 8), torch.randn(2, 5, 3, 4), torch.rand(2, 5, 3)
    cases = [
        ("q must be", dict(q=torch.randn(2, 5, 8))),
        ("k must match", dict(k=torch.randn(2, 5, 3, 7))),
        ("v must be", dict(v=torch.randn(2, 6, 3, 4))),
        ("v must have q's dtype", dict(v=v.double())),
        ("k must have q's dtype", dict(k=q.half())),
        ("beta must be", dict(beta=torch.rand(2, 5))),
        ("beta must be floating point", dict(beta=torch.ones(2, 5, 3, dtype=torch.long))),
        ("decay must be None or one of", dict(decay=torch.zeros(3))),
        ("decay must be None or one of", dict(decay=torch.zeros(2, 5, 3, 4))),
        ("decay must be a floating-point", dict(decay=torch.zeros(2, 5, 3, dtype=torch.long))),
        ("decay is a log-decay", dict(decay=torch.full((2, 5, 3), 0.5))),
        ("initial_state must be", dict(initial_state=torch.zeros(2, 3, 4, 8))),
        ("chunk_size must be", dict(chunk_size=0)),
        ("backend=", dict(backend="cuda")),
    ]
    for message, change in cases:
        args = dict(q=q, k=q, v=v, beta=beta) | change
        with pytest.raises(ValueError, match=message):
            delta_rule(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("beta"), **args)
    with pytest.raises(ValueError, match="T = 0"):
        delta_rule(q[:, :0], q[:, :0], v[:, :0], beta[:, :0])


def test_triton_limits_are_clear_errors():
    big, v = torch.randn(1, 5, 1, 300), torch.randn(1, 5, 1, 4)
    with pytest.raises(ValueError, match="K <= 256"):
        delta_rule(big, big, v, torch.rand(1, 5, 1), backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("form", DECAY_FORMS)
def test_cuda_auto_backend_matches_reference(form):
    B, T, H, K, V = 2, 300, 4, 64, 96
    inputs = _inputs(B, T, H, K, V, form, True)
    cuda = {n: t.detach().cuda().requires_grad_() if t is not None else None
            for n, t in inputs.items()}
    do, dht = torch.randn(B, T, H, V, device="cuda"), torch.randn(B, H, K, V, device="cuda")
    o_ref, ht_ref, grads_ref = _run_and_grads(cuda, "reference", torch.float64, do, dht)
    for backend in ("auto", "torch"):
        o, ht, grads = _run_and_grads(cuda, backend, torch.float32, do, dht)
        assert_close("o", o_ref, o, 1e-4)
        assert_close("final_state", ht_ref, ht, 1e-4)
        for name, ref in grads_ref.items():
            assert_close(name, ref, grads[name], 1e-4)


def test_reflections_keep_the_state_bounded():
    # beta = 2 and unit keys make every transition orthogonal: |S_t| <= |S_0| + sum 2 |v_j|
    T = 3 * CHUNK
    q, k = torch.randn(1, T, 1, 8), F.normalize(torch.randn(1, T, 1, 8), dim=-1)
    v, beta, h0 = torch.randn(1, T, 1, 8), torch.full((1, T, 1), 2.0), torch.randn(1, 1, 8, 8)
    _, ht = delta_rule(q, k, v, beta, initial_state=h0, output_final_state=True,
                       chunk_size=CHUNK, backend="torch")
    bound = h0.norm() + 2 * v.norm(dim=-1).sum()
    assert math.isfinite(ht.norm().item()) and ht.norm() <= bound


# generalized_delta_rule: S_t = (Diag(exp(g_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T


def _generalized_inputs(B, T, H, K, V, form, with_state):
    """RWKV-7's shape of inputs: a = -kappa_hat, b = kappa_hat * iclr with a unit kappa_hat and
    iclr in [0, 1], so the transition's eigenvalues stay in [-1, 1]."""
    kappa = F.normalize(torch.randn(B, T, H, K), dim=-1)
    inputs = {
        "q": torch.randn(B, T, H, K),
        "k": 0.5 * torch.randn(B, T, H, K),
        "v": torch.randn(B, T, H, V),
        "a": -kappa,
        "b": kappa * torch.rand(B, T, H, K),
        "decay": _decay(form, B, T, H, K),
        "initial_state": torch.randn(B, H, K, V) if with_state else None,
    }
    return {name: t.requires_grad_() if t is not None else None for name, t in inputs.items()}


def _generalized_run_and_grads(inputs, backend, dtype, do, dht, **options):
    leaves = {name: t for name, t in inputs.items() if t is not None}
    for t in leaves.values():
        t.grad = None
    cast = {name: t.to(dtype) if t is not None else None for name, t in inputs.items()}
    o, ht = generalized_delta_rule(cast.pop("q"), cast.pop("k"), cast.pop("v"), cast.pop("a"),
                                   cast.pop("b"), **cast, output_final_state=True,
                                   backend=backend, **options)
    ((o.double() * do.double()).sum() + (ht.double() * dht.double()).sum()).backward()
    return o, ht, {"d" + name: t.grad.clone() for name, t in leaves.items()}


def _generalized_compare(inputs, ratio, dtype=torch.float32, grad_ratio=None, **options):
    do, dht = _upstream(inputs)
    o_ref, ht_ref, grads_ref = _generalized_run_and_grads(inputs, "reference", torch.float64,
                                                          do, dht, **options)
    o, ht, grads = _generalized_run_and_grads(inputs, "torch", dtype, do, dht,
                                              chunk_size=CHUNK, **options)
    assert o.dtype == dtype and ht.dtype == torch.float32
    assert_close("o", o_ref, o, ratio)
    assert_close("final_state", ht_ref, ht, ratio)
    assert set(grads) == set(grads_ref)
    for name, ref in grads_ref.items():
        assert_close(name, ref, grads[name], grad_ratio or ratio)


@pytest.mark.parametrize("B,T", LENGTHS)
@pytest.mark.parametrize("form", DECAY_FORMS)
@pytest.mark.parametrize("with_state", [False, True])
def test_generalized_matches_reference_forward_and_backward(B, T, form, with_state):
    inputs = _generalized_inputs(B, T, 2, 12, 10, form, with_state)
    _generalized_compare(inputs, 2e-5, grad_ratio=5e-5)


def _naive_dplr_recurrence(q, k, v, a, b, g, scale, h0):
    """fla's naive dplr form, written apart from generalized_reference.py."""
    h = h0.clone()
    o = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype)
    for t in range(q.shape[1]):
        written = k[:, t, :, :, None] * v[:, t, :, None, :]
        written = written + (h * a[:, t, :, :, None]).sum(-2, keepdim=True) * b[:, t, :, :, None]
        if g is not None:
            h = h * (g[:, t].exp()[..., None, None] if g.dim() == 3 else g[:, t].exp()[..., None])
        h = h + written
        o[:, t] = (h * (q[:, t] * scale)[..., None]).sum(-2)
    return o, h


@pytest.mark.parametrize("form", DECAY_FORMS)
def test_generalized_naive_recurrence_matches_reference(form):
    inputs = _generalized_inputs(2, 2 * CHUNK + 5, 3, 8, 6, form, True)
    q, k, v, a, b, g, h0 = (None if t is None else t.detach().double() for t in inputs.values())
    o_naive, h_naive = _naive_dplr_recurrence(q, k, v, a, b, g, 0.5, h0)
    o, ht = generalized_delta_rule(q, k, v, a, b, decay=g, scale=0.5, initial_state=h0,
                                   output_final_state=True, backend="reference")
    assert_close("o", o_naive, o, 1e-12)
    assert_close("final_state", h_naive, ht, 1e-12)


@pytest.mark.parametrize("form", DECAY_FORMS)
def test_generalized_with_delta_rule_vectors_is_the_delta_rule(form):
    # (I - beta k k^T) A S = (A + k (-beta A k)^T) S for a diagonal A: a = -beta exp(g) k, b = k
    inputs = _inputs(2, 2 * CHUNK + 5, 2, 12, 10, form, True)
    q, k, v, beta, decay, h0 = (None if t is None else t.detach() for t in inputs.values())
    gate = 1.0 if decay is None else decay.exp() if decay.dim() == 4 else decay.exp()[..., None]
    o_delta, h_delta = delta_rule(q, k, v, beta, decay=decay, initial_state=h0,
                                  output_final_state=True, backend="reference")
    o, ht = generalized_delta_rule(q, k, beta[..., None] * v, -beta[..., None] * gate * k, k,
                                   decay=decay, initial_state=h0, output_final_state=True,
                                   chunk_size=CHUNK, backend="torch")
    assert_close("o", o_delta, o, 2e-5)
    assert_close("final_state", h_delta, ht, 2e-5)


@pytest.mark.parametrize("form", DECAY_FORMS)
def test_generalized_whole_equals_pieces_with_carried_state_equals_token_by_token(form):
    B, T = 2, 2 * CHUNK + 3
    inputs = _generalized_inputs(B, T, 2, 12, 10, form, True)
    q, k, v, a, b, decay, h0 = (None if t is None else t.detach() for t in inputs.values())

    def run(start, stop, state):
        return generalized_delta_rule(
            q[:, start:stop], k[:, start:stop], v[:, start:stop], a[:, start:stop],
            b[:, start:stop], decay=None if decay is None else decay[:, start:stop],
            initial_state=state, output_final_state=True, chunk_size=CHUNK, backend="torch")

    whole, whole_state = run(0, T, h0)
    pieces, state = [], h0
    for start, stop in [(0, 5), (5, 6), (6, CHUNK + 2), (CHUNK + 2, T)]:
        o, state = run(start, stop, state)
        pieces.append(o)
    assert_close("o pieces", whole, torch.cat(pieces, 1), 1e-5)
    assert_close("final_state pieces", whole_state, state, 1e-5)

    steps, state = [], h0
    for t in range(T):
        o, state = generalized_delta_rule_recurrent(
            _token(q, t), _token(k, t), _token(v, t), _token(a, t), _token(b, t),
            _token(decay, t), 12**-0.5, state, output_final_state=True)
        steps.append(o)
    assert_close("o token by token", whole, torch.cat(steps, 1), 1e-5)
    assert_close("final_state token by token", whole_state, state, 1e-5)


@pytest.mark.parametrize("form", ["step", "channel"])
def test_generalized_strong_decay_is_finite_and_exact(form):
    inputs = _generalized_inputs(1, 2 * CHUNK + 5, 2, 12, 10, form, True)
    with torch.no_grad():
        inputs["decay"].copy_(-20 * torch.rand(inputs["decay"].shape) ** 2)
        inputs["decay"][:, 3] = -torch.inf
    _generalized_compare(inputs, 2e-5)


@pytest.mark.parametrize("form", ["step", "channel"])
def test_generalized_bf16_close_to_reference(form):
    inputs = _generalized_inputs(2, CHUNK + 9, 2, 12, 10, form, True)
    _generalized_compare(inputs, 3e-2, dtype=torch.bfloat16)


def test_generalized_one_token_is_the_recurrent_form():
    inputs = _generalized_inputs(2, 1, 2, 8, 8, "channel", True)
    q, k, v, a, b, decay, h0 = (t.detach() for t in inputs.values())
    o, ht = generalized_delta_rule(q, k, v, a, b, decay=decay, initial_state=h0,
                                   output_final_state=True)
    o_step, state = generalized_delta_rule_recurrent(q, k, v, a, b, decay, 8**-0.5, h0, True)
    assert torch.equal(o, o_step) and torch.equal(ht, state)


def test_generalized_bad_inputs_name_the_argument():
    q, v = torch.randn(2, 5, 3, 8), torch.randn(2, 5, 3, 4)
    cases = [
        ("a must match", dict(a=torch.randn(2, 5, 3, 7))),
        ("b must match", dict(b=torch.randn(2, 5, 8))),
        ("b must have q's dtype", dict(b=q.double())),
        ("v must be", dict(v=torch.randn(2, 5, 2, 4))),
        ("decay is a log-decay", dict(decay=torch.full((2, 5, 3, 8), 0.1))),
        ("initial_state must be", dict(initial_state=torch.zeros(2, 3, 8, 5))),
        ("backend='cpu' is not one of", dict(backend="cpu")),
    ]
    for message, change in cases:
        args = dict(q=q, k=q, v=v, a=q, b=q) | change
        with pytest.raises(ValueError, match=message):
            generalized_delta_rule(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("a"),
                                   args.pop("b"), **args)
    with pytest.raises(ValueError, match="generalized_delta_rule_recurrent: takes one token"):
        generalized_delta_rule_recurrent(q, q, v, q, q)
