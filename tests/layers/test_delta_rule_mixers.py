"""The delta-rule mixers (deltanet, gated_deltanet, kda): each equals its definition written out
token by token from its parameters (forward, final state and every gradient), run whole, in
pieces or one token at a time; Gated DeltaNet equals transformers' Qwen3-Next layer and KDA
transformers' Kimi Linear layer on the same weights; the state is a fixed size; bad options are
named. The state contract itself is checked in test_contract.py."""

import pytest
import torch
from einops import rearrange

import zoo
from zoo import ConfigError
from zoo.layers import build_mixer
from zoo.layers.deltanet import DeltaNet
from zoo.layers.gated_deltanet import GatedDeltaNet
from zoo.layers.kda import KimiDeltaAttention
from zoo.testing import assert_close

D_MODEL = 64
CASES = [
    ("deltanet", {"n_heads": 4, "chunk_size": 8}),
    ("deltanet", {"n_heads": 2, "use_short_conv": False, "output_gate": True,
                  "allow_neg_eigval": True, "value_factor": 2}),
    ("deltanet", {"n_heads": 4, "head_dim": 8, "conv_size": 3, "conv_bias": True,
                  "chunk_size": 8}),
    ("gated_deltanet", {"n_heads": 2, "n_value_heads": 4, "head_dim": 16, "conv_bias": True,
                        "chunk_size": 8}),
    ("gated_deltanet", {"n_heads": 4, "use_short_conv": False, "output_gate": False,
                        "value_factor": 2, "chunk_size": 8}),
    ("kda", {"n_heads": 4, "decay_lora": 8, "gate_lora": 4, "conv_bias": True,
             "chunk_size": 8}),
    ("kda", {"n_heads": 2, "use_short_conv": False, "value_factor": 2,
             "allow_neg_eigval": True}),
]
IDS = [f"{name}-{i}" for i, (name, _) in enumerate(CASES)]


def _perturbed(name, options, dtype=torch.float64):
    """The mixer with every parameter moved off its initial value (norm weights off one, conv
    biases off zero), so that a parameter used in the wrong place shows."""
    torch.manual_seed(0)
    mixer = build_mixer({"type": name, **options}, D_MODEL).to(dtype)
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mixer


def _silu(z):
    return z * torch.sigmoid(z)


def _softplus(z):
    return torch.log1p(torch.exp(z))


def by_hand(mixer, x):
    """The mixer's definition for x (B, T, d_model), one token at a time, from its parameters:
    returns y (B, T, d_model), the final S (B, H, K, V) and the conv window (B, W - 1, C)."""
    B, T, _ = x.shape
    K, V, H, groups = mixer.head_dim, mixer.value_dim, mixer.n_value_heads, mixer.groups
    u = torch.cat([x @ mixer.q_proj.weight.T, x @ mixer.k_proj.weight.T,
                   x @ mixer.v_proj.weight.T], dim=-1)  # (B, T, C) before the convolution
    window = None
    if mixer.conv1d is None:
        mixed = _silu(u)
    else:
        W = mixer.conv_size
        weight = mixer.conv1d.weight[:, 0]  # (C, W): tap W - 1 meets the current token
        past = torch.cat([u.new_zeros(B, W - 1, u.shape[-1]), u], dim=1)
        mixed = []
        for t in range(T):
            z = (past[:, t:t + W] * weight.T).sum(1)
            if mixer.conv1d.bias is not None:
                z = z + mixer.conv1d.bias
            mixed.append(_silu(z))
        mixed = torch.stack(mixed, dim=1)
        window = past[:, -(W - 1):]
    q, k, v = mixed.split([mixer.key_channels, mixer.key_channels, mixer.value_channels], -1)
    q, k = (rearrange(a, "b t (h k) -> b t h k", k=K) for a in (q, k))
    q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
    k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    v = rearrange(v, "b t (h v) -> b t h v", v=V)
    beta = torch.sigmoid(x @ mixer.b_proj.weight.T) * (2 if mixer.allow_neg_eigval else 1)

    if isinstance(mixer, GatedDeltaNet):  # one decay per step and value head, (B, T, H, 1)
        rate = torch.exp(mixer.A_log)
        decay = torch.exp(-rate * _softplus(x @ mixer.a_proj.weight.T + mixer.dt_bias))[..., None]
    elif isinstance(mixer, KimiDeltaAttention):  # one per key channel, (B, T, H, K)
        f = (x @ mixer.f_a_proj.weight.T) @ mixer.f_b_proj.weight.T + mixer.dt_bias
        rate = torch.exp(mixer.A_log)[:, None]
        decay = torch.exp(-rate * _softplus(rearrange(f, "b t (h k) -> b t h k", k=K)))
    else:
        decay = torch.ones(B, T, H, 1, dtype=x.dtype)

    S = x.new_zeros(B, H, K, V)
    outputs = []
    for t in range(T):
        heads = []
        for h in range(H):
            qk_head = h // groups  # value head h reads query-key head h // groups
            q_t, k_t, v_t = q[:, t, qk_head], k[:, t, qk_head], v[:, t, h]
            S_h = decay[:, t, h, :, None] * S[:, h]  # the gate first, on the old state
            error = v_t - (k_t[:, :, None] * S_h).sum(1)  # v_t - S^T k_t
            S_h = S_h + k_t[:, :, None] * (beta[:, t, h, None] * error)[:, None, :]
            heads.append(((q_t * K**-0.5)[:, :, None] * S_h).sum(1))  # S^T (scale q)
            S = torch.cat([S[:, :h], S_h[:, None], S[:, h + 1:]], dim=1)
        outputs.append(torch.stack(heads, dim=1))
    o = torch.stack(outputs, dim=1)  # (B, T, H, V)

    o = o / torch.sqrt((o * o).mean(-1, keepdim=True) + mixer.o_norm.eps) * mixer.o_norm.weight
    if isinstance(mixer, KimiDeltaAttention):
        gate = (x @ mixer.g_a_proj.weight.T) @ mixer.g_b_proj.weight.T
        o = o * torch.sigmoid(rearrange(gate, "b t (h v) -> b t h v", v=V))
    elif mixer.g_proj is not None:
        o = o * _silu(rearrange(x @ mixer.g_proj.weight.T, "b t (h v) -> b t h v", v=V))
    y = rearrange(o, "b t h v -> b t (h v)") @ mixer.o_proj.weight.T
    return y, S, window


def _in_pieces(mixer, x, cuts):
    state, outputs = None, []
    bounds = [0, *cuts, x.shape[1]]
    for start, end in zip(bounds[:-1], bounds[1:]):
        y, state = mixer(x[:, start:end], state)
        outputs.append(y)
    return torch.cat(outputs, dim=1), state


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
@torch.no_grad()
def test_mixer_equals_its_definition_token_by_token(name, options):
    mixer = _perturbed(name, options)
    x = torch.randn(2, 21, D_MODEL, dtype=torch.float64)
    want, want_S, want_window = by_hand(mixer, x)
    # whole; in pieces (chunks and a remainder); a prompt then one token at a time (decoding)
    for label, cuts in [("whole", []), ("pieces", [8, 13]), ("decoded", list(range(9, 21)))]:
        y, state = _in_pieces(mixer, x, cuts)
        assert_close(f"{name} {label}: y", want, y, 1e-10)
        assert_close(f"{name} {label}: S", want_S, state.recurrent_state, 1e-10)
        if want_window is None:
            assert state.conv_state is None
        else:
            assert_close(f"{name} {label}: conv window", want_window, state.conv_state, 1e-12)


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_every_gradient_equals_the_definitions(name, options):
    mixer = _perturbed(name, options).train()
    x = torch.randn(2, 13, D_MODEL, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 13, D_MODEL, dtype=torch.float64)
    y, _ = mixer(x)
    (y * dy).sum().backward()
    got = {"x": x.grad.clone()} | {n: p.grad.clone() for n, p in mixer.named_parameters()}
    mixer.zero_grad()
    x.grad = None
    want_y, _, _ = by_hand(mixer, x)
    (want_y * dy).sum().backward()
    want = {"x": x.grad} | {n: p.grad for n, p in mixer.named_parameters()}
    assert set(got) == set(want)
    for key in want:
        assert want[key].abs().max() > 0, f"{name}: the definition gives {key} no gradient"
        assert_close(f"{name}: d{key}", want[key], got[key], 1e-9)


def _qwen3_next_layer(n_k_heads, n_v_heads, head_k_dim, head_v_dim):
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    config = Qwen3NextConfig(
        hidden_size=D_MODEL, linear_num_key_heads=n_k_heads, linear_num_value_heads=n_v_heads,
        linear_key_head_dim=head_k_dim, linear_value_head_dim=head_v_dim,
        linear_conv_kernel_dim=4, num_hidden_layers=4, rms_norm_eps=1e-6,
    )
    torch.manual_seed(0)
    layer = Qwen3NextGatedDeltaNet(config, 0).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


def _from_qwen3_next(layer) -> dict[str, torch.Tensor]:
    """Qwen3-Next's packed projections as zoo's: in_proj_qkvz holds, per key head, its q and k
    rows and its group's v and z rows; in_proj_ba, per key head, its group's b and a rows."""
    n_k, ratio = layer.num_k_heads, layer.num_v_heads // layer.num_k_heads
    dk, group_v = layer.head_k_dim, ratio * layer.head_v_dim
    qkvz = layer.in_proj_qkvz.weight.view(n_k, 2 * dk + 2 * group_v, D_MODEL)
    q, k, v, z = qkvz.split([dk, dk, group_v, group_v], dim=1)
    b, a = layer.in_proj_ba.weight.view(n_k, 2 * ratio, D_MODEL).split([ratio, ratio], dim=1)
    rows = lambda w: w.reshape(-1, D_MODEL)
    return {"q_proj.weight": rows(q), "k_proj.weight": rows(k), "v_proj.weight": rows(v),
            "g_proj.weight": rows(z), "b_proj.weight": rows(b), "a_proj.weight": rows(a),
            "conv1d.weight": layer.conv1d.weight, "A_log": layer.A_log,
            "dt_bias": layer.dt_bias, "o_norm.weight": layer.norm.weight,
            "o_proj.weight": layer.out_proj.weight}


@pytest.mark.parametrize("n_k_heads,n_v_heads,head_dim", [(2, 4, 16), (4, 4, 8)])
@torch.no_grad()
def test_gated_deltanet_equals_transformers_qwen3_next_layer(n_k_heads, n_v_heads, head_dim):
    layer = _qwen3_next_layer(n_k_heads, n_v_heads, head_dim, head_dim)
    ours = GatedDeltaNet(D_MODEL, n_heads=n_k_heads, n_value_heads=n_v_heads, head_dim=head_dim,
                         norm_eps=1e-6, chunk_size=8).eval()
    ours.load_state_dict(_from_qwen3_next(layer), strict=True)
    x = torch.randn(2, 21, D_MODEL)
    y, _ = ours(x)
    assert_close("gated_deltanet vs Qwen3NextGatedDeltaNet", layer(x), y, 1e-5)


@torch.no_grad()
def test_kda_equals_transformers_kimi_linear_layer():
    from transformers.models.kimi_linear.configuration_kimi_linear import KimiLinearConfig
    from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearDeltaAttention

    config = KimiLinearConfig(hidden_size=D_MODEL, num_hidden_layers=2, linear_num_heads=4,
                              linear_head_dim=16, linear_conv_kernel_dim=4, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    layer = KimiLinearDeltaAttention(config, 0).eval()
    gate = layer.forget_gate
    with torch.no_grad():  # transformers leaves these two to the model's initialisation
        gate.A_log.copy_(torch.empty_like(gate.A_log).uniform_(1, 16).log())
        gate.dt_bias.copy_(torch.randn_like(gate.dt_bias) - 3)
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = KimiDeltaAttention(D_MODEL, n_heads=4, head_dim=16, norm_eps=1e-6, chunk_size=8)
    state = {name.removeprefix("forget_gate."): p for name, p in layer.state_dict().items()}
    state["A_log"] = state["A_log"].view(-1)  # transformers': (1, 1, H, 1)
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, 21, D_MODEL)
    y, _ = ours.eval()(x)
    assert_close("kda vs KimiLinearDeltaAttention", layer(x), y, 1e-5)


@torch.no_grad()
def test_state_is_the_conv_window_and_a_float32_state_whatever_the_length():
    config = zoo.load_config("gated-deltanet-tiny")
    mixer = build_mixer(config.mixer, config.d_model).to(torch.bfloat16)
    channels = 2 * 2 * 16 + 4 * 16  # q and k: 2 heads of 16; v: 4 heads of 16
    want = 3 * channels * 2 + 4 * 16 * 16 * 4  # bf16 window of conv_size - 1, float32 S
    sizes = {mixer.state_size(n, torch.bfloat16) for n in (1, 40, 1_000_000)}
    assert sizes == {want}
    _, state = mixer(torch.randn(2, 40, config.d_model, dtype=torch.bfloat16))
    assert state.conv_state.dtype == torch.bfloat16
    assert state.recurrent_state.dtype == torch.float32
    assert state.nbytes() == want


@pytest.mark.parametrize("spec,match", [
    ({"type": "gated_deltanet", "n_heads": 3, "n_value_heads": 4, "head_dim": 16},
     r"n_value_heads=4 must be a multiple of n_heads=3"),
    ({"type": "deltanet", "n_heads": 3}, r"d_model=64 is not divisible by n_heads=3"),
    ({"type": "kda", "conv_size": 1}, r"mixer.conv_size=1 must be an integer >= 2"),
    ({"type": "kda", "n_value_heads": 8}, r"mixer 'kda' has no option 'n_value_heads'"),
    ({"type": "deltanet", "gate_lora": 8}, r"mixer 'deltanet' has no option 'gate_lora'"),
    ({"type": "gated_deltanet", "n_value_heads": 0},
     r"mixer.n_value_heads=0 must be an integer >= 1 or null"),
])
def test_bad_options_are_named(spec, match):
    with pytest.raises(ValueError, match=match):
        build_mixer(spec, D_MODEL)


def test_a_config_with_a_bad_combination_names_the_layer():
    with pytest.raises(ConfigError, match=r"config.mixer \(layer 0\): gated_deltanet: "
                                          r"n_value_heads=6 must be a multiple of n_heads=4"):
        zoo.ZooConfig(mixer={"type": "gated_deltanet", "n_heads": 4, "n_value_heads": 6})


@torch.no_grad()
def test_a_state_from_a_sibling_delta_rule_mixer_is_refused():
    _, state = DeltaNet(D_MODEL)(torch.randn(1, 3, D_MODEL))
    with pytest.raises(TypeError, match="another mixer"):
        GatedDeltaNet(D_MODEL)(torch.randn(1, 1, D_MODEL), state)


def test_hybrid_config_is_three_gated_deltanet_layers_to_one_attention():
    config = zoo.load_config("gated-deltanet-hybrid-tiny")
    assert config.describe_layers() == ["gated_deltanet + swiglu"] * 3 + ["attention + swiglu"]
    model = zoo.ZooForCausalLM(config)
    mixers = [layer.mixer for layer in model.model.layers]
    assert [m.bounded for m in mixers] == [True, True, True, False]
