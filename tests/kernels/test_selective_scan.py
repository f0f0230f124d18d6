import pytest
import torch

from zoo.kernels import selective_scan
from zoo.kernels.selective_scan import selective_scan_recurrent
from zoo.testing import assert_close

BACKENDS = ["torch", "triton"]
NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0"]


def _inputs(batch, dim, N, T, groups, extras, with_state, dtype=torch.float32):
    """Leaves in NAMES order (None where unused); A negative as Mamba's -exp(A_log)."""
    def leaf(t):
        return t.to(dtype).requires_grad_()

    bc_shape = (batch, N, T) if groups is None else (batch, groups, N, T)
    u = leaf(torch.randn(batch, dim, T))
    # with softplus, raw deltas reach far below zero (softplus's small-value branch); without,
    # delta is the step itself and must be positive
    delta = leaf(torch.randn(batch, dim, T) * 2 if extras else torch.rand(batch, dim, T))
    A = leaf(-torch.exp(torch.randn(dim, N) * 0.5))
    B, C = leaf(torch.randn(bc_shape)), leaf(torch.randn(bc_shape))
    D = leaf(torch.randn(dim)) if extras else None
    z = leaf(torch.randn(batch, dim, T)) if extras else None
    bias = leaf(torch.randn(dim) * 0.5) if extras else None
    h0 = leaf(torch.randn(batch, dim, N)) if with_state else None
    return [u, delta, A, B, C, D, z, bias, h0]


def _run(backend, leaves, softplus, dtype=None):
    cast = (lambda t: t) if dtype is None else (lambda t: None if t is None else t.to(dtype))
    u, delta, A, B, C, D, z, bias, h0 = (cast(t) for t in leaves)
    return selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=softplus,
                          initial_state=h0, output_final_state=True, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,dim,N,T,groups", [
    (1, 8, 4, 1, None), (2, 16, 4, 7, None), (2, 16, 5, 65, 2), (1, 12, 3, 6, 3),
])
@pytest.mark.parametrize("extras,with_state", [(False, False), (True, True)])
def test_matches_reference_forward_and_backward(backend, batch, dim, N, T, groups, extras,
                                                with_state):
    leaves = _inputs(batch, dim, N, T, groups, extras, with_state)
    present = [(name, t) for name, t in zip(NAMES, leaves) if t is not None]
    dy = torch.randn(batch, dim, T)
    dht = torch.randn(batch, dim, N)

    ref_y, ref_ht = _run("reference", leaves, extras, dtype=torch.float64)
    ((ref_y * dy.double()).sum() + (ref_ht * dht.double()).sum()).backward()
    ref_grads = [t.grad.clone() for _, t in present]
    for _, t in present:
        t.grad = None

    y, ht = _run(backend, leaves, extras)
    assert y.dtype == torch.float32 and ht.dtype == torch.float32
    ((y * dy).sum() + (ht * dht).sum()).backward()
    assert_close("y", ref_y, y, 1e-5)
    assert_close("final_state", ref_ht, ht, 1e-5)
    for (name, t), ref in zip(present, ref_grads):
        assert_close(f"d{name}", ref, t.grad, 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_and_bias_without_gate_match_reference(backend):
    # D and delta_bias with softplus but no z: the gate's absence is its own branch in the kernels
    leaves = _inputs(2, 16, 4, 9, 4, True, False)
    leaves[NAMES.index("z")] = None
    present = [(name, t) for name, t in zip(NAMES, leaves) if t is not None]
    dy = torch.randn(2, 16, 9)
    ref_y, _ = _run("reference", leaves, True, dtype=torch.float64)
    (ref_y * dy.double()).sum().backward()
    ref_grads = [t.grad.clone() for _, t in present]
    for _, t in present:
        t.grad = None
    y, _ = _run(backend, leaves, True)
    (y * dy).sum().backward()  # the final state is left out of the loss
    assert_close("y", ref_y, y, 1e-5)
    for (name, t), ref in zip(present, ref_grads):
        assert_close(f"d{name}", ref, t.grad, 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_close_to_reference(backend):
    leaves = _inputs(2, 16, 4, 33, None, True, True)
    ref_y, ref_ht = _run("reference", leaves, True, dtype=torch.float64)
    y, ht = _run(backend, leaves, True, dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16 and ht.dtype == torch.float32
    assert_close("y_bf16", ref_y, y, 3e-2)
    assert_close("final_state_bf16", ref_ht, ht, 3e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_split_with_carried_state_equals_whole(backend):
    u, delta, A, B, C, D, z, bias, _ = [t.detach() if t is not None else None
                                        for t in _inputs(2, 16, 4, 21, 2, True, False)]
    kw = dict(D=D, delta_bias=bias, delta_softplus=True, output_final_state=True,
              backend=backend)
    whole, h_whole = selective_scan(u, delta, A, B, C, z=z, **kw)
    pieces, h = [], None
    for s, e in [(0, 2), (2, 3), (3, 21)]:
        y, h = selective_scan(u[..., s:e], delta[..., s:e], A, B[..., s:e], C[..., s:e],
                              z=z[..., s:e], initial_state=h, **kw)
        pieces.append(y)
    assert_close("y", whole, torch.cat(pieces, -1), 1e-5)
    assert_close("final_state", h_whole, h, 1e-5)


def test_long_sequence_with_strong_decay_stays_finite():
    # cumulative log-decays reach about -1e4 over the sequence: a scan that exponentiated
    # exp(-cumsum) or products over the whole sequence would overflow or produce nan
    batch, dim, N, T = 1, 4, 3, 600
    u, B, C = torch.randn(batch, dim, T), torch.randn(batch, N, T), torch.randn(batch, N, T)
    delta = torch.full((batch, dim, T), 2.0)
    A = -torch.linspace(1, 8, dim * N).view(dim, N)
    ref, ref_h = selective_scan(u.double(), delta.double(), A.double(), B.double(), C.double(),
                                output_final_state=True, backend="reference")
    y, h = selective_scan(u, delta, A, B, C, output_final_state=True, backend="torch")
    assert_close("y", ref, y, 1e-5)
    assert_close("final_state", ref_h, h, 1e-5)


def test_bad_shapes_name_the_argument():
    u, delta = torch.randn(2, 8, 5), torch.rand(2, 8, 5)
    A, B, C = -torch.rand(8, 4), torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    with pytest.raises(ValueError, match="delta"):
        selective_scan(u, delta[:, :, :4], A, B, C)
    with pytest.raises(ValueError, match="A must"):
        selective_scan(u, delta, A[:7], B, C)
    with pytest.raises(ValueError, match="B must"):
        selective_scan(u, delta, A, torch.randn(2, 3, 5), C)
    with pytest.raises(ValueError, match="G=3"):
        selective_scan(u, delta, A, torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="initial_state"):
        selective_scan(u, delta, A, B, C, initial_state=torch.randn(2, 8, 5))
    with pytest.raises(ValueError, match="delta_bias"):
        selective_scan(u, delta, A, B, C, delta_bias=torch.randn(4))
    with pytest.raises(ValueError, match="backend"):
        selective_scan(u, delta, A, B, C, backend="cuda")


@pytest.mark.gpu
def test_cuda_auto_backend_matches_reference():
    leaves = [t.detach().cuda() if t is not None else None
              for t in _inputs(2, 256, 16, 300, 2, True, True)]
    ref_y, ref_h = _run("reference", leaves, True)
    y, h = _run("auto", leaves, True)
    assert_close("y", ref_y, y, 1e-4)
    assert_close("final_state", ref_h, h, 1e-4)


@pytest.mark.parametrize("groups", [None, 2])
@pytest.mark.parametrize("extras", [False, True])
def test_recurrent_step_by_step_matches_reference(groups, extras):
    batch, dim, N, T = 2, 8, 4, 9
    leaves = _inputs(batch, dim, N, T, groups, extras, with_state=True)
    present = [(name, t) for name, t in zip(NAMES, leaves) if t is not None]
    dy, dht = torch.randn(batch, dim, T), torch.randn(batch, dim, N)

    ref_y, ref_ht = _run("reference", leaves, extras, dtype=torch.float64)
    ((ref_y * dy.double()).sum() + (ref_ht * dht.double()).sum()).backward()
    ref_grads = [t.grad.clone() for _, t in present]
    for _, t in present:
        t.grad = None

    u, delta, A, B, C, D, z, bias, h = leaves
    ys = []
    for t in range(T):
        step = slice(t, t + 1)
        y_t, h = selective_scan_recurrent(
            u[..., step], delta[..., step], A, B[..., step], C[..., step], D,
            None if z is None else z[..., step], bias, extras, h, output_final_state=True)
        ys.append(y_t)
    y = torch.cat(ys, -1)
    ((y * dy).sum() + (h * dht).sum()).backward()
    assert y.dtype == torch.float32 and h.dtype == torch.float32
    assert_close("y", ref_y, y, 1e-5)
    assert_close("final_state", ref_ht, h, 1e-5)
    for (name, t), ref in zip(present, ref_grads):
        assert_close(f"d{name}", ref, t.grad, 1e-4)


def test_one_step_on_the_torch_path_is_the_recurrent_form():
    u, delta, A, B, C, D, z, bias, h0 = [t.detach() for t in _inputs(2, 8, 4, 1, 2, True, True)]
    args = (u, delta, A, B, C, D, z, bias, True, h0, True)
    for got, expected in zip(selective_scan(*args, backend="torch"),
                             selective_scan_recurrent(*args)):
        assert torch.equal(got, expected)


def test_recurrent_form_takes_one_step():
    u, A, B = torch.randn(1, 4, 3), -torch.rand(4, 2), torch.randn(1, 2, 3)
    with pytest.raises(ValueError, match=r"selective_scan_recurrent: takes one step .* T = 3"):
        selective_scan_recurrent(u, u, A, B, B)
