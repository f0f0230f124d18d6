"""RetNet's multi-scale retention: the gammas, the parallel (T x T), chunked and recurrent forms
agreeing, the mixer against the parallel form written out, relative position, and the
per-head GroupNorm. The contract suite covers chunk / step consistency of the mixer."""

import pytest
import torch
from einops import rearrange

from zoo.kernels.linear_attention import linear_attention
from zoo.layers import build_mixer
from zoo.layers.retnet import parallel_retention, retention_log_gammas
from zoo.testing import assert_close

D_MODEL = 64


def test_gammas_are_one_minus_two_to_the_minus_five_minus_h():
    gammas = retention_log_gammas(8).exp()
    expected = torch.tensor([1 - 2.0 ** (-5 - h) for h in range(8)], dtype=torch.float64)
    assert_close("gamma", expected, gammas, 1e-14)


@pytest.mark.parametrize("T", [1, 37, 130])
@pytest.mark.parametrize("with_state", [False, True])
def test_parallel_chunked_and_recurrent_forms_agree(T, with_state):
    B, H, K, V = 2, 4, 8, 16
    q, k = (torch.randn(B, T, H, K, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, T, H, V, dtype=torch.float64)
    initial = torch.randn(B, H, K, V, dtype=torch.float64) if with_state else None
    log_gamma = retention_log_gammas(H)
    scale = K ** -0.5
    o_par, s_par = parallel_retention(q, k, v, log_gamma, scale, initial)
    forms = {
        "chunked": dict(backend="torch", chunk_size=16),
        "one chunk (parallel through the op)": dict(backend="torch", chunk_size=256),
        "recurrent": dict(backend="reference"),
    }
    for name, kwargs in forms.items():
        o, s = linear_attention(q, k, v, decay=log_gamma, scale=scale, initial_state=initial,
                                output_final_state=True, **kwargs)
        assert_close(f"o {name}", o_par, o, 1e-10)
        assert_close(f"state {name}", s_par, s, 1e-10)


def test_parallel_form_gradients_match_chunked():
    B, T, H, K = 1, 29, 2, 4
    inputs = [torch.randn(B, T, H, K, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    initial = torch.randn(B, H, K, K, dtype=torch.float64, requires_grad=True)
    log_gamma = retention_log_gammas(H)
    grads = []
    for chunked in (False, True):
        if chunked:
            o, s = linear_attention(*inputs, decay=log_gamma, initial_state=initial,
                                    output_final_state=True, chunk_size=8, backend="torch")
        else:
            o, s = parallel_retention(*inputs, log_gamma, 1.0, initial)
        loss = (o * o.detach().sin()).sum() + (s * s.detach().cos()).sum()
        grads.append(torch.autograd.grad(loss, [*inputs, initial]))
    for name, a, b in zip(("dq", "dk", "dv", "dinitial"), *grads):
        assert_close(name, a, b, 1e-10)


@torch.no_grad()
def test_mixer_matches_parallel_form_written_out():
    torch.manual_seed(0)
    mixer = build_mixer({"type": "retnet", "n_heads": 4, "chunk_size": 16}, D_MODEL)
    x = torch.randn(2, 45, D_MODEL)
    y, state = mixer(x)
    q = rearrange(mixer.q_proj(x), "b t (h k) -> b t h k", h=4)
    k = rearrange(mixer.k_proj(x), "b t (h k) -> b t h k", h=4)
    v = rearrange(mixer.v_proj(x), "b t (h v) -> b t h v", h=4)
    cos, sin = mixer.rotary.cos_sin(0, 45, q.dtype)
    q, k = mixer.rotary.apply(q, cos, sin), mixer.rotary.apply(k, cos, sin)
    o, memory = parallel_retention(q, k, v, retention_log_gammas(4), 16 ** -0.5)
    # GroupNorm per head, written as a per-head layer norm with the affine of group_norm
    mean = o.mean(-1, keepdim=True)
    var = o.var(-1, keepdim=True, unbiased=False)
    normed = rearrange((o - mean) / torch.sqrt(var + mixer.norm_eps), "b t h v -> b t (h v)")
    normed = normed * mixer.group_norm.weight + mixer.group_norm.bias
    expected = mixer.o_proj(normed * torch.nn.functional.silu(mixer.g_proj(x)))
    assert_close("y", expected, y, 1e-5)
    assert_close("state", memory, state.memory, 1e-5)
    assert state.position == 45


@torch.no_grad()
def test_position_enters_only_relatively():
    """From an empty memory, the outputs do not depend on where the sequence starts."""
    torch.manual_seed(0)
    mixer = build_mixer({"type": "retnet", "n_heads": 4}, D_MODEL)
    x = torch.randn(1, 20, D_MODEL)
    y0, _ = mixer(x)
    later = mixer.init_state(1)
    later.position = 1000
    y1, state = mixer(x, later)
    assert_close("shifted start", y0, y1, 1e-4)
    assert state.position == 1020
    # and position does enter: the same weights without the rotation give other outputs
    unrotated = build_mixer({"type": "retnet", "n_heads": 4, "rope_theta": None}, D_MODEL)
    unrotated.load_state_dict(mixer.state_dict())
    assert (unrotated(x)[0] - y0).abs().max() > 1e-3


@torch.no_grad()
def test_group_norm_is_per_head():
    """Scaling one head's values leaves the output unchanged (a per-head norm undoes it; a norm
    over all heads together would not)."""
    torch.manual_seed(0)
    mixer = build_mixer({"type": "retnet", "n_heads": 4}, D_MODEL)
    x = torch.randn(2, 15, D_MODEL)
    y, _ = mixer(x)
    value_dim = mixer.value_dim
    mixer.v_proj.weight[value_dim : 2 * value_dim] *= 50.0  # head 1 only
    assert_close("one head scaled", y, mixer(x)[0], 1e-4)


def test_value_dim_and_bad_options():
    mixer = build_mixer({"type": "retnet", "n_heads": 4}, D_MODEL)
    assert (mixer.key_dim, mixer.value_dim) == (16, 32)  # the paper's value_factor 2
    assert mixer.state_size(1) == mixer.state_size(10**6) == 4 * 4 * 16 * 32
    with pytest.raises(ValueError, match="d_model=64 is not divisible by n_heads=3"):
        build_mixer({"type": "retnet", "n_heads": 3}, D_MODEL)
    with pytest.raises(ValueError, match="value_factor=0"):
        build_mixer({"type": "retnet", "value_factor": 0}, D_MODEL)
