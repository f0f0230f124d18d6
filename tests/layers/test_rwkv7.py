"""RWKV-7 (x070): the `rwkv7` mixer and `rwkv7_cmix` FFN against RWKV-7 written token by token
the way BlinkDL's RNN-mode reference (RWKV-LM, RWKV-v7/rwkv_v7_demo_rnn.py) writes it, layer by
layer and as a whole model; the value residual across layers, in pieces and under gradients;
its named errors. (The state contract at layer 0 is checked by test_contract.py.)"""

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.app.cli import main
from zoo.layers import build_ffn, build_mixer
from zoo.layers.rwkv4 import ChannelMixState
from zoo.layers.rwkv7 import FIRST_VALUE, Rwkv7State
from zoo.testing import assert_close

D = 64
SPEC = {"type": "rwkv7", "head_size": 16, "decay_lora": 8, "iclr_lora": 8, "value_lora": 4,
        "gate_lora": 12, "n_layers": 3, "chunk_size": 8}


@torch.no_grad()
def _randomise(module):
    """Parameters well away from their initial values, so that every term of the layer (the
    adapters start near zero, the decays near 1) moves the output."""
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf.startswith("x_"):
            p.uniform_(0, 1)
        elif leaf == "w0":
            p.copy_(torch.linspace(-4, 3, p.numel()).view_as(p))
        elif leaf in ("k_k", "k_a", "a0", "v0", "r_k") or p.dim() == 1:
            p.normal_(0, 0.7)
        else:
            p.normal_(0, 0.3)
    return module


def _weights(module) -> dict[str, torch.Tensor]:
    """The parameters in float64, squeezed as BlinkDL's loader squeezes them."""
    return {name: p.detach().double().squeeze() for name, p in module.named_parameters()}


def _time_mixing(H, N, eps, x, x_prev, v_first, state, z, first_layer):
    """One token of RWKV-7 time mixing as BlinkDL's RNN-mode `time_mixing` writes it, for a
    batch: x, x_prev (B, C); state (B, H, N, N) in RWKV's (V, K) layout; z the layer's
    weights. The decay is x070's first soft clamp (softplus), not the sigmoid form zoo uses."""
    B, C = x.shape
    xx = x_prev - x
    xr, xw, xk = x + xx * z["x_r"], x + xx * z["x_w"], x + xx * z["x_k"]
    xv, xa, xg = x + xx * z["x_v"], x + xx * z["x_a"], x + xx * z["x_g"]

    r = xr @ z["receptance.weight"].T
    w = torch.tanh(xw @ z["w1"]) @ z["w2"]
    k = xk @ z["key.weight"].T
    v = xv @ z["value.weight"].T
    if first_layer:
        v_first = v
    else:
        v = v + (v_first - v) * torch.sigmoid(z["v0"] + (xv @ z["v1"]) @ z["v2"])
    a = torch.sigmoid(z["a0"] + (xa @ z["a1"]) @ z["a2"])
    g = torch.sigmoid(xg @ z["g1"]) @ z["g2"]

    kk = k * z["k_k"]
    kk = F.normalize(kk.view(B, H, N), dim=-1, p=2.0).view(B, C)
    k = k * (1 + (a - 1) * z["k_a"])

    w = -F.softplus(-(z["w0"] + w)) - 0.5
    w = torch.exp(-torch.exp(w))
    vk = v.view(B, H, N, 1) @ k.view(B, H, 1, N)
    ab = (-kk).view(B, H, N, 1) @ (kk * a).view(B, H, 1, N)
    state = state * w.view(B, H, 1, N) + state @ ab + vk
    out = (state @ r.view(B, H, N, 1)).view(B, H * N)

    out = F.group_norm(out, num_groups=H, weight=z["ln_x.weight"], bias=z["ln_x.bias"], eps=eps)
    out = out + ((r * k * z["r_k"].flatten()).view(B, H, N).sum(-1, keepdim=True)
                 * v.view(B, H, N)).view(B, C)
    return (out * g) @ z["output.weight"].T, x, state, v_first


def _channel_mixing(x, x_prev, z):
    """One token of RWKV-7 channel mixing as BlinkDL's RNN-mode `channel_mixing` writes it."""
    xx = x_prev - x
    k = x + xx * z["x_k"]
    k = torch.relu(k @ z["key.weight"].T) ** 2
    return k @ z["value.weight"].T, x


def _layer_by_token(mixer, x, v_first=None):
    """The mixer's (y, (V, K) state, shift, first values) computed token by token in float64."""
    z, (B, T, C) = _weights(mixer), x.shape
    H, N = mixer.n_heads, mixer.head_size
    x = x.double()
    x_prev, state = torch.zeros(B, C, dtype=torch.float64), torch.zeros(B, H, N, N,
                                                                       dtype=torch.float64)
    ys, firsts = [], []
    for t in range(T):
        y, x_prev, state, first = _time_mixing(
            H, N, mixer.ln_x.eps, x[:, t], x_prev, None if v_first is None else v_first[:, t],
            state, z, first_layer=mixer.layer_idx == 0)
        ys.append(y)
        firsts.append(first)
    return torch.stack(ys, 1), state, x_prev, torch.stack(firsts, 1)


@pytest.mark.parametrize("dtype,ratio", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@torch.no_grad()
def test_first_layer_matches_blinkdl_token_by_token(dtype, ratio):
    torch.manual_seed(0)
    mixer = _randomise(build_mixer(SPEC, D, layer_idx=0))
    x = torch.randn(2, 37, D, dtype=torch.float64)
    want, want_state, want_shift, want_first = _layer_by_token(mixer, x)
    mixer = mixer.to(dtype)
    context = {}
    y, state = mixer(x.to(dtype), context=context)
    assert y.dtype == dtype
    assert_close("y", want, y, ratio)
    # zoo keeps the state as (K, V), RWKV-LM as (V, K)
    assert_close("state", want_state, state.wkv.transpose(-1, -2), ratio)
    assert_close("shift", want_shift.to(dtype), state.shift, 0.0)
    assert_close("first values", want_first, context[FIRST_VALUE], ratio)


@pytest.mark.parametrize("dtype,ratio", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@torch.no_grad()
def test_later_layer_matches_blinkdl_token_by_token_with_the_value_residual(dtype, ratio):
    torch.manual_seed(1)
    mixer = _randomise(build_mixer(SPEC, D, layer_idx=2))
    x, v_first = torch.randn(2, 37, D, dtype=torch.float64), torch.randn(2, 37, D,
                                                                         dtype=torch.float64)
    want, want_state, _, _ = _layer_by_token(mixer, x, v_first)
    mixer = mixer.to(dtype)
    context = {FIRST_VALUE: v_first.to(dtype)}
    y, state = mixer(x[:, :20].to(dtype), context={FIRST_VALUE: v_first[:, :20].to(dtype)})
    y2, state = mixer(x[:, 20:].to(dtype), state, context={FIRST_VALUE: v_first[:, 20:].to(dtype)})
    assert_close("y", want, torch.cat([y, y2], 1), ratio)
    assert_close("state", want_state, state.wkv.transpose(-1, -2), ratio)
    assert list(context) == [FIRST_VALUE], "a later layer must not write the first values"


@torch.no_grad()
def test_channel_mix_matches_blinkdl_token_by_token_and_carries_its_shift():
    torch.manual_seed(2)
    ffn = _randomise(build_ffn({"type": "rwkv7_cmix", "hidden_size": 96}, D)).double()
    z = _weights(ffn)
    x = torch.randn(2, 19, D, dtype=torch.float64)
    x_prev, want = torch.zeros(2, D, dtype=torch.float64), []
    for t in range(19):
        y, x_prev = _channel_mixing(x[:, t], x_prev, z)
        want.append(y)
    want = torch.stack(want, 1)
    for cuts in ([], [7], list(range(1, 19))):
        state, outs = None, []
        for start, end in zip([0, *cuts], [*cuts, 19]):
            y, state = ffn(x[:, start:end], state)
            outs.append(y)
        assert_close(f"rwkv7_cmix split at {cuts}", want, torch.cat(outs, 1), 1e-12)
    assert isinstance(state, ChannelMixState)
    assert state.nbytes() == ffn.state_size(19, torch.float64) == ffn.state_size(
        65536, torch.float64)
    assert_close("shift", x[:, -1], state.shift, 0.0)


def _model_by_token(model, ids):
    """Logits of a whole RWKV-7 ZooForCausalLM run as BlinkDL's RWKV_RNN.forward runs it: one
    token at a time through every layer (ln0 on the embedding, ln1, time mixing, ln2, channel
    mixing, ln_out, head), layer 0's values handed to the later layers."""
    def layer_norm(x, norm):
        return F.layer_norm(x, (x.shape[-1],), norm.weight.double(), norm.bias.double(),
                            norm.eps)

    blocks = model.model.layers
    C = model.config.d_model
    B, T = ids.shape
    att = [_weights(block.mixer) for block in blocks]
    ffn = [_weights(block.ffn) for block in blocks]
    states = [[torch.zeros(B, C, dtype=torch.float64),
               torch.zeros(B, b.mixer.n_heads, b.mixer.head_size, b.mixer.head_size,
                           dtype=torch.float64),
               torch.zeros(B, C, dtype=torch.float64)] for b in blocks]
    logits = []
    for t in range(T):
        x = layer_norm(model.model.embed_tokens.weight.double()[ids[:, t]], model.model.embed_norm)
        v_first = None
        for i, block in enumerate(blocks):
            xx = layer_norm(x, block.mixer_norm)
            xx, states[i][0], states[i][1], v_first = _time_mixing(
                block.mixer.n_heads, block.mixer.head_size, block.mixer.ln_x.eps, xx,
                states[i][0], v_first, states[i][1], att[i], first_layer=i == 0)
            x = x + xx
            xx, states[i][2] = _channel_mixing(layer_norm(x, block.ffn_norm), states[i][2], ffn[i])
            x = x + xx
        logits.append(layer_norm(x, model.model.norm) @ model.lm_head.weight.double().T)
    return torch.stack(logits, 1)


def _model(n_layers=3):
    config = zoo.load_config("rwkv7-tiny")
    config.n_layers = n_layers
    config.mixer = {**config.mixer, "n_layers": n_layers, "value_lora": 4}
    torch.manual_seed(3)
    model = zoo.ZooForCausalLM(config).eval()
    for block in model.model.layers:
        _randomise(block.mixer)
        _randomise(block.ffn)
    return model


@torch.no_grad()
def test_model_matches_blinkdl_rnn_token_by_token():
    model = _model().double()
    ids = torch.randint(0, 256, (2, 23), generator=torch.Generator().manual_seed(4))
    want = _model_by_token(model, ids)
    assert_close("logits, whole", want, model(ids).logits, 1e-10)
    cache, pieces = model.new_cache(), []
    for start, end in ((0, 9), (9, 10), (10, 23)):
        pieces.append(model(ids[:, start:end], cache=cache, use_cache=True).logits)
    assert_close("logits, prefill then steps", want, torch.cat(pieces, 1), 1e-10)


@torch.no_grad()
def test_value_residual_carries_layer_0_values_to_later_layers():
    model = _model()
    # with layer 0's time mixing silenced, its values reach the rest only through the residual
    model.model.layers[0].mixer.output.weight.zero_()
    ids = torch.randint(0, 256, (2, 15), generator=torch.Generator().manual_seed(5))
    before = model(ids).logits
    model.model.layers[0].mixer.value.weight.mul_(-1.5)
    after = model(ids).logits
    assert (after - before).abs().max() > 1e-3 * before.abs().max()


@torch.no_grad()
def test_later_layer_chunk_and_step_consistency_with_its_first_values():
    torch.manual_seed(6)
    mixer = _randomise(build_mixer(SPEC, D, layer_idx=1))
    x, v_first = torch.randn(2, 19, D), torch.randn(2, 19, D)
    whole, _ = mixer(x, context={FIRST_VALUE: v_first})
    for cuts in ([5, 11], list(range(1, 19))):
        state, outs = None, []
        for start, end in zip([0, *cuts], [*cuts, 19]):
            y, state = mixer(x[:, start:end], state,
                             context={FIRST_VALUE: v_first[:, start:end]})
            outs.append(y)
        assert_close(f"layer 1 split at {cuts}", whole, torch.cat(outs, 1), 1e-5)
    other, _ = mixer(x, context={FIRST_VALUE: v_first + 1.0})
    assert (other - whole).abs().max() > 1e-3 * whole.abs().max()


def test_gradients_reach_every_parameter_of_a_stack():
    model = _model().train()
    ids = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(7))
    model(ids, labels=ids).loss.backward()
    missing = [name for name, p in model.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().max() == 0]
    assert not missing, f"no gradient reaches {missing}"
    assert hasattr(model.model.layers[1].mixer, "v1")
    assert not hasattr(model.model.layers[0].mixer, "v1"), "layer 0 has no value residual"


def test_value_residual_gradient_reaches_layer_0_through_the_later_layers():
    model = _model()
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(8))
    # only the residual path: layer 0's own output is silenced, as above
    with torch.no_grad():
        model.model.layers[0].mixer.output.weight.zero_()
    model(ids).logits.square().sum().backward()
    assert model.model.layers[0].mixer.value.weight.grad.abs().max() > 0


def test_later_layer_without_first_values_is_a_clear_error():
    mixer = build_mixer(SPEC, D, layer_idx=1)
    x = torch.randn(2, 5, D)
    with pytest.raises(ValueError, match="layer 1.*no first-layer values"):
        mixer(x)
    with pytest.raises(ValueError, match=r"has shape \(2, 4, 64\)"):
        mixer(x, context={FIRST_VALUE: torch.zeros(2, 4, D)})


def test_hybrid_without_rwkv7_at_layer_0_names_the_problem():
    config = zoo.load_config("rwkv7-tiny")
    config.layers = [{"at": [0], "mixer": {"type": "attention", "n_heads": 4}}]
    model = zoo.ZooForCausalLM(config)
    with pytest.raises(ValueError, match="needs an rwkv7 layer 0"):
        model(torch.zeros(1, 3, dtype=torch.long))


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="head_size=48"):
        build_mixer({"type": "rwkv7", "head_size": 48}, D)
    with pytest.raises(ValueError, match="iclr_lora=0"):
        build_mixer({"type": "rwkv7", "iclr_lora": 0}, D)


def test_state_is_bounded_and_its_size_honest():
    mixer = build_mixer(SPEC, D)
    _, state = mixer(torch.randn(3, 9, D))
    assert isinstance(state, Rwkv7State)
    assert state.wkv.shape == (3, 4, 16, 16) and state.wkv.dtype == torch.float32
    assert state.nbytes() == mixer.state_size(9) == mixer.state_size(65536)
    assert mixer.state_size(1, torch.bfloat16) == D * 2 + 4 * 16 * 16 * 4


def test_zoo_info_describes_rwkv7_tiny(capsys):
    assert main(["info", "rwkv7-tiny"]) == 0
    out = capsys.readouterr().out
    assert "rwkv7" in out and "rwkv7_cmix" in out


def test_triton_backend_matches_torch_in_a_later_layer_forward_and_backward():
    """The generalized_delta_rule Triton kernels (under the interpreter here) inside the mixer,
    value residual included: outputs, state and every gradient as the chunked PyTorch form."""
    torch.manual_seed(9)
    mixer = _randomise(build_mixer(SPEC, D, layer_idx=1))
    x = torch.randn(2, 11, D, requires_grad=True)
    v_first = torch.randn(2, 11, D, requires_grad=True)
    results = {}
    for backend in ("torch", "triton"):
        mixer.backend = backend
        mixer.zero_grad()
        x.grad = v_first.grad = None
        y, state = mixer(x, context={FIRST_VALUE: v_first})
        y.square().sum().backward()
        grads = {name: p.grad.clone() for name, p in mixer.named_parameters()}
        results[backend] = (y, state.wkv, x.grad.clone(), v_first.grad.clone(), grads)
    (y, wkv, dx, dv, grads), (y_tri, wkv_tri, dx_tri, dv_tri, grads_tri) = results.values()
    assert_close("y", y, y_tri, 1e-5)
    assert_close("wkv", wkv, wkv_tri, 1e-5)
    assert_close("dx", dx, dx_tri, 1e-4)
    assert_close("dv_first", dv, dv_tri, 1e-4)
    for name in grads:
        assert_close(f"d{name}", grads[name], grads_tri[name], 1e-4)
