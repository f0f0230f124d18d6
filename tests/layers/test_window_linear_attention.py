"""The window_linear_attention mixer (LoLCATs): softmax attention where the window covers what
it needs, sliding-window attention without the linear part, the definition written out over
the whole sequence otherwise, a flat decoding state, and named errors. The contract suite
covers chunk and step consistency for its test_variants."""

import pytest
import torch
from einops import rearrange

from zoo.layers import build_mixer
from zoo.layers.attention import Attention
from zoo.layers.rotary import Rotary
from zoo.layers.window_linear_attention import WindowLinearAttention
from zoo.testing import assert_close

D_MODEL = 64


def _mixer(**options) -> WindowLinearAttention:
    torch.manual_seed(0)
    return build_mixer({"type": "window_linear_attention", **options}, D_MODEL).eval()


def _teacher(mixer: WindowLinearAttention, window: int | None) -> Attention:
    """Softmax attention with the mixer's projection weights, copied by name."""
    teacher = Attention(D_MODEL, n_heads=mixer.n_heads, n_kv_heads=mixer.n_kv_heads,
                        window=window).eval()
    missing = teacher.load_state_dict(mixer.state_dict(), strict=False).missing_keys
    assert not missing, f"attention weights without a counterpart in the mixer: {missing}"
    return teacher


def _definition(mixer: WindowLinearAttention, x: torch.Tensor) -> torch.Tensor:
    """The mixer written out as (T, T) matrices over absolute positions, with no state."""
    T, D = x.shape[1], mixer.head_dim
    split = "b t (h d) -> b t h d"
    q = rearrange(mixer.q_proj(x), split, d=D)
    k = rearrange(mixer.k_proj(x), split, d=D)
    v = rearrange(mixer.v_proj(x), split, d=D)
    cos, sin = mixer.rotary.cos_sin(0, T, x.dtype)
    q_rot, k_rot = Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)
    mapped = (q_rot, k_rot) if mixer.feature_maps_after_rotary else (q, k)
    phi_q = mixer.feature_map(mapped[0], "query")
    phi_k = mixer.feature_map(mapped[1], "key").repeat_interleave(mixer.groups, dim=2)
    k_rot, v = (t.repeat_interleave(mixer.groups, dim=2) for t in (k_rot, v))
    t, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    scores = D ** -0.5 * torch.einsum("bthd,bshd->bhts", q_rot, k_rot)
    scores = scores.masked_fill(~((j <= t) & (j > t - mixer.window)), -torch.inf)
    softmax_part = torch.exp(scores - scores.amax(-1, keepdim=True))
    r = mixer.log_linear_scale.exp() * mixer.feature_map.kernel_scale
    linear_part = torch.einsum("bthf,bshf->bhts", phi_q, phi_k) * (j <= t - mixer.window)
    weights = softmax_part + r[None, :, None, None] * linear_part
    o = torch.einsum("bhts,bshd->bthd", weights, v) / rearrange(weights.sum(-1),
                                                                 "b h t -> b t h")[..., None]
    return mixer.o_proj(rearrange(o, "b t h d -> b t (h d)"))


@pytest.mark.parametrize("window", [1, 6, 40])
@pytest.mark.parametrize("n_kv_heads", [4, 2])
@torch.no_grad()
def test_without_linear_part_equals_sliding_window_attention(window, n_kv_heads):
    mixer = _mixer(n_heads=4, n_kv_heads=n_kv_heads, window=window)
    mixer.log_linear_scale.fill_(-torch.inf)  # r = exp(-inf) = 0: the linear part is off
    x = torch.randn(2, 29, D_MODEL)
    y, _ = mixer(x)
    expected, _ = _teacher(mixer, window)(x)
    assert_close(f"window={window}", expected, y, 1e-5)


@pytest.mark.parametrize("options", [{}, {"feature_map": "elu+1", "n_kv_heads": 1},
                                     {"feature_maps_after_rotary": False}])
@torch.no_grad()
def test_window_covering_the_sequence_equals_softmax_attention(options):
    mixer = _mixer(n_heads=2, window=32, **options)
    x = torch.randn(2, 32, D_MODEL)
    expected, _ = _teacher(mixer, None)(x)
    y, _ = mixer(x)
    assert_close("whole", expected, y, 1e-5)
    # the same through a carried state, the last tokens decoded one at a time
    y_first, state = mixer(x[:, :20])
    steps = []
    for t in range(20, 32):
        y_t, state = mixer(x[:, t : t + 1], state)
        steps.append(y_t)
    assert_close("prefill + decode", expected, torch.cat([y_first, *steps], 1), 1e-5)


@pytest.mark.parametrize("options", [
    {"window": 5},
    {"window": 3, "n_heads": 4, "n_kv_heads": 2, "feature_maps_after_rotary": False},
    {"window": 1, "feature_map": "favor+", "feature_dim": 24},
    {"window": 7, "feature_map": "relu", "chunk_size": 8},
])
@torch.no_grad()
def test_output_matches_definition(options):
    mixer = _mixer(**options)
    mixer.log_linear_scale.copy_(torch.linspace(-1.0, 1.0, mixer.n_heads))
    x = torch.randn(2, 41, D_MODEL)
    y, _ = mixer(x)
    assert_close(str(options), _definition(mixer, x), y, 1e-5)


@pytest.mark.parametrize("after_rotary", [True, False])
@torch.no_grad()
def test_feature_maps_see_rotary_queries_and_keys_as_asked(after_rotary):
    mixer = _mixer(n_heads=2, window=4, feature_maps_after_rotary=after_rotary)
    seen = []
    mixer.feature_map.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    x = torch.randn(1, 6, D_MODEL)
    _, state = mixer(x[:, :3])
    mixer(x[:, 3:], state)  # positions 3 .. 5: the rotary offset comes from the state
    q = rearrange(mixer.q_proj(x), "b t (h d) -> b t h d", d=mixer.head_dim)
    if after_rotary:
        q = Rotary.apply(q, *mixer.rotary.cos_sin(0, 6, q.dtype))
    assert_close("queries seen by the feature map", q, torch.cat([seen[0], seen[2]], 1), 1e-6)


@torch.no_grad()
def test_decoding_state_is_flat():
    mixer = _mixer(n_heads=4, n_kv_heads=2, window=8)
    assert mixer.state_size(128) == mixer.state_size(8192)
    # per KV head: 8 window slots of k, v (16 each) and hedgehog features (32), then S and z
    assert mixer.state_size(1) == 4 * (8 * 2 * (16 + 16 + 32) + 2 * 32 * 17)
    x = torch.randn(2, 30, D_MODEL)
    _, state = mixer(x[:, :3])
    sizes = set()
    for t in range(3, 30):
        _, state = mixer(x[:, t : t + 1], state)
        sizes.add(state.nbytes())
    assert sizes == {mixer.state_size(30)}
    assert state.position == 30 and state.k.shape == (2, 8, 2, 16)


def test_linear_scale_learns_and_weights_copy_by_name():
    mixer = _mixer(n_heads=4, window=3)
    teacher = Attention(D_MODEL, n_heads=4)
    assert set(teacher.state_dict()) < set(mixer.state_dict())
    x = torch.randn(2, 12, D_MODEL)
    y, _ = mixer.train()(x)
    y.square().mean().backward()
    assert mixer.log_linear_scale.grad.abs().min() > 0, "older tokens move r"


def test_bad_options_name_the_field():
    with pytest.raises(ValueError, match="window=0 must be an int >= 1"):
        WindowLinearAttention(D_MODEL, window=0)
    with pytest.raises(ValueError, match="window=2.5"):
        WindowLinearAttention(D_MODEL, window=2.5)
    with pytest.raises(ValueError, match="d_model=66 is not divisible by n_heads=4"):
        WindowLinearAttention(66, n_heads=4)
    with pytest.raises(ValueError, match="n_heads=4 is not divisible by n_kv_heads=3"):
        WindowLinearAttention(D_MODEL, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="feature_map='identity' gives signed features"):
        WindowLinearAttention(D_MODEL, feature_map="identity")
    with pytest.raises(ValueError, match="feature_map='nope' is not one of"):
        WindowLinearAttention(D_MODEL, feature_map="nope")
    with pytest.raises(ValueError, match="has no option 'windows'"):
        build_mixer({"type": "window_linear_attention", "windows": 4}, D_MODEL)


@pytest.mark.parametrize("options", [{"n_kv_heads": 2, "window": 6},
                                     {"window": 1, "feature_maps_after_rotary": False}])
@torch.no_grad()
def test_attention_weights_give_the_mixers_output(options):
    """The weights attention transfer's cross-entropy compares: o_proj(weights @ v) is the
    mixer's forward, and the teacher's Attention.attention_weights is its softmax."""
    mixer = _mixer(n_heads=4, **options)
    x = torch.randn(2, 23, D_MODEL)
    weights = mixer.attention_weights(x)
    assert weights.shape == (2, 4, 23, 23)
    assert_close("rows", torch.ones(2, 4, 23), weights.sum(-1), 1e-6)
    v = rearrange(mixer.v_proj(x), "b t (h d) -> b t h d", d=mixer.head_dim)
    v = v.repeat_interleave(mixer.groups, dim=2)
    o = torch.einsum("bhtj,bjhd->bthd", weights, v)
    assert_close("forward", mixer(x)[0], mixer.o_proj(rearrange(o, "b t h d -> b t (h d)")),
                 1e-5)
    for window in (None, 5):
        teacher = _teacher(mixer, window)
        p = teacher.attention_weights(x)
        o = torch.einsum("bhtj,bjhd->bthd", p, v)
        assert_close(f"teacher window={window}", teacher(x)[0],
                     teacher.o_proj(rearrange(o, "b t h d -> b t (h d)")), 1e-5)
