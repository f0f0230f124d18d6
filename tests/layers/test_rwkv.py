"""RWKV-4 and RWKV-6 layers: against transformers' RWKV-4 modules and a token-by-token RWKV-6
definition, the channel-mix FFNs' carried token shift, and the tiny models end to end. (The
mixers' state contract is checked by test_contract.py.)"""

import pytest
import torch
import torch.nn.functional as F
from transformers import RwkvConfig, RwkvForCausalLM
from transformers.models.rwkv.modeling_rwkv import RwkvFeedForward, RwkvSelfAttention

import zoo
from zoo.layers import build_ffn, build_mixer
from zoo.layers.rwkv4 import ChannelMixState
from zoo.layers.rwkv6 import Rwkv6State
from zoo.testing import assert_close

D = 64


def _hf_config(**overrides):
    options = dict(vocab_size=256, hidden_size=D, num_hidden_layers=2, attention_hidden_size=D,
                   intermediate_size=4 * D, layer_norm_epsilon=1e-5, rescale_every=0,
                   tie_word_embeddings=False)
    return RwkvConfig(**{**options, **overrides})


def _hf_state(B, n_layers=2):
    state = [torch.zeros(B, D, n_layers) for _ in range(5)]
    state[4] -= 1e30
    return state


@torch.no_grad()
def test_rwkv4_time_mix_matches_transformers_with_carried_state():
    ours = build_mixer({"type": "rwkv4", "n_layers": 2}, D, layer_idx=1)
    theirs = RwkvSelfAttention(_hf_config(), layer_id=1)
    theirs.load_state_dict(ours.state_dict())  # same names and shapes, strictly
    x = torch.randn(2, 11, D)
    state, hf_state, outs, hf_outs = None, _hf_state(2), [], []
    # (not a 1-token piece: transformers' T = 1 path broadcasts the shift wrongly for batch > 1)
    for piece in (x[:, :6], x[:, 6:8], x[:, 8:]):
        y, state = ours(piece, state)
        hf_y, hf_state = theirs(piece, state=hf_state, use_cache=True)
        outs.append(y)
        hf_outs.append(hf_y)
    assert_close("y", torch.cat(hf_outs, 1), torch.cat(outs, 1), 1e-5)
    for i, row in enumerate(["num", "den", "max"]):
        assert_close(f"state {row}", hf_state[2 + i][:, :, 1], state.wkv[:, i], 1e-5)
    assert_close("shift", hf_state[1][:, :, 1], state.shift, 0.0)


@torch.no_grad()
def test_rwkv4_channel_mix_matches_transformers():
    ours = build_ffn({"type": "rwkv4_cmix"}, D)
    theirs = RwkvFeedForward(_hf_config(), layer_id=0)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 9, D)
    y1, state = ours(x[:, :4])
    y2, _ = ours(x[:, 4:], state)
    hf_state = _hf_state(2)
    hf_y1, hf_state = theirs(x[:, :4], state=hf_state)
    hf_y2, _ = theirs(x[:, 4:], state=hf_state)
    assert_close("y", torch.cat([hf_y1, hf_y2], 1), torch.cat([y1, y2], 1), 1e-6)


def _rwkv6_by_token(m, x):
    """RWKV-6 time mixing written from its definition, one token at a time (float64)."""
    B, T, C = x.shape
    H, K = m.n_heads, m.head_size
    prev, S, outs = torch.zeros(B, C, dtype=x.dtype), torch.zeros(B, H, K, K, dtype=x.dtype), []
    for t in range(T):
        xt = x[:, t]
        dx = prev - xt
        lora = torch.tanh((xt + dx * m.time_maa_x[0, 0]) @ m.time_maa_w1).view(B, 5, -1)
        mw, mk, mv, mr, mg = torch.einsum("bfr,frc->fbc", lora, m.time_maa_w2)
        r = m.receptance(xt + dx * (m.time_maa_r[0, 0] + mr)).view(B, H, K)
        k = m.key(xt + dx * (m.time_maa_k[0, 0] + mk)).view(B, H, K)
        v = m.value(xt + dx * (m.time_maa_v[0, 0] + mv)).view(B, H, K)
        g = F.silu(m.gate(xt + dx * (m.time_maa_g[0, 0] + mg)))
        xw = xt + dx * (m.time_maa_w[0, 0] + mw)
        w = torch.exp(-torch.exp(m.time_decay[0, 0] + torch.tanh(xw @ m.time_decay_w1)
                                 @ m.time_decay_w2)).view(B, H, K)
        kv = k[..., :, None] * v[..., None, :]
        o = torch.einsum("bhk,bhkv->bhv", r, S + m.time_faaaa[..., None] * kv)
        S = w[..., None] * S + kv
        o = (o - o.mean(-1, keepdim=True)) / torch.sqrt(o.var(-1, unbiased=False, keepdim=True)
                                                        + m.ln_x.eps)
        o = o.reshape(B, C) * m.ln_x.weight + m.ln_x.bias
        outs.append(m.output(o * g))
        prev = xt
    return torch.stack(outs, 1), S


def _randomise(module):
    """Every parameter away from its initial value, decays from ~1 to ~e^-20 per step."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith("time_maa_") and p.shape[0] == 1:
                p.uniform_(0, 1)
            elif name == "time_decay":
                p.copy_(torch.linspace(-6, 3, p.numel()).view_as(p))
            elif p.dim() == 1 or name == "time_faaaa":
                p.normal_(0, 0.5)
            else:
                p.normal_(0, 0.3)
    return module


@pytest.mark.parametrize("dtype,ratio", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@torch.no_grad()
def test_rwkv6_time_mix_matches_its_token_by_token_definition(dtype, ratio):
    spec = {"type": "rwkv6", "head_size": 16, "mix_lora": 4, "decay_lora": 8, "chunk_size": 16}
    m = _randomise(build_mixer(spec, D)).to(dtype)
    x = torch.randn(2, 37, D, dtype=torch.float64)
    ref, ref_state = _rwkv6_by_token(m.double(), x)
    m = m.to(dtype)
    y, state = m(x[:, :20].to(dtype))
    y2, state = m(x[:, 20:].to(dtype), state)
    assert_close("y", ref, torch.cat([y, y2], 1), ratio)
    assert_close("state", ref_state, state.wkv, ratio)


def test_rwkv6_bad_head_size_is_a_clear_error():
    with pytest.raises(ValueError, match="head_size"):
        build_mixer({"type": "rwkv6", "head_size": 48}, D)


@pytest.mark.parametrize("name", ["rwkv4_cmix", "rwkv6_cmix"])
@torch.no_grad()
def test_channel_mix_chunk_and_step_consistency(name):
    ffn = _randomise(build_ffn(name, D))
    x = torch.randn(2, 19, D)
    whole, _ = ffn(x)
    for cuts in ([7], [3, 4, 12], list(range(1, 19))):
        state, outs = None, []
        for start, end in zip([0, *cuts], [*cuts, 19]):
            y, state = ffn(x[:, start:end], state)
            outs.append(y)
        assert_close(f"{name} split at {cuts}", whole, torch.cat(outs, 1), 1e-6)
    # the first token is mixed with zeros, not with itself: the shift is real
    assert not torch.allclose(whole[:, 1], ffn(x[:, 1:2])[0][:, 0])


@pytest.mark.parametrize("name", ["rwkv4_cmix", "rwkv6_cmix"])
@torch.no_grad()
def test_channel_mix_state_is_honest_and_checked(name):
    ffn = build_ffn(name, D)
    x = torch.randn(3, 9, D)
    y, state = ffn(x)
    assert isinstance(state, ChannelMixState)
    assert state.nbytes() == ffn.state_size(9) == ffn.state_size(65536)
    # the shift is the last token in storage of its own, not a view pinning the whole input
    assert state.shift.untyped_storage().nbytes() == state.nbytes() * 3
    assert_close(name, y, ffn(x, ffn.init_state(3, x.device, x.dtype))[0], 0.0)
    with pytest.raises(ValueError, match="batch size"):
        ffn(torch.randn(2, 1, D), state)
    with pytest.raises(TypeError, match="another layer"):
        ffn(x, Rwkv6State(torch.zeros(3, D), torch.zeros(3, 1, 4, 4)))


@torch.no_grad()
def test_rwkv4_triton_backend_matches_torch_in_the_mixer():
    torch.manual_seed(0)
    m = build_mixer({"type": "rwkv4", "backend": "torch"}, D)
    x = torch.randn(2, 13, D)
    y, state = m(x)
    m.backend = "triton"
    y_tri, state_tri = m(x)
    assert_close("y", y, y_tri, 1e-5)
    assert_close("wkv", state.wkv, state_tri.wkv, 1e-5)


def test_rwkv6_triton_backend_matches_torch_forward_and_backward():
    spec = {"type": "rwkv6", "head_size": 16, "mix_lora": 4, "decay_lora": 8, "chunk_size": 16}
    m = _randomise(build_mixer(spec, D))
    x = torch.randn(2, 37, D, requires_grad=True)
    results = {}
    for backend in ("torch", "triton"):
        m.backend = backend
        m.zero_grad()
        x.grad = None
        y, state = m(x)
        y.square().sum().backward()
        grads = {name: p.grad.clone() for name, p in m.named_parameters()}
        results[backend] = (y, state.wkv, x.grad.clone(), grads)
    (y, wkv, dx, grads), (y_tri, wkv_tri, dx_tri, grads_tri) = results.values()
    assert_close("y", y, y_tri, 1e-5)
    assert_close("wkv", wkv, wkv_tri, 1e-5)
    assert_close("dx", dx, dx_tri, 1e-4)
    for name in grads:
        assert_close(f"d{name}", grads[name], grads_tri[name], 1e-4)


# zoo name fragment -> transformers RWKV-4 name fragment, applied in this order
HF_NAMES = {
    "model.embed_tokens.": "rwkv.embeddings.", "model.embed_norm.": "rwkv.blocks.0.pre_ln.",
    "mixer_norm.": "ln1.", "ffn_norm.": "ln2.", "mixer.": "attention.", "ffn.": "feed_forward.",
    "model.layers.": "rwkv.blocks.", "model.norm.": "rwkv.ln_out.", "lm_head.": "head.",
}


def _hf_name(name):
    for a, b in HF_NAMES.items():
        name = name.replace(a, b)
    return name


@torch.no_grad()
def test_rwkv4_model_has_transformers_logits_with_weights_copied_by_name():
    torch.manual_seed(0)
    theirs = RwkvForCausalLM(_hf_config()).eval()
    ours = zoo.ZooForCausalLM(zoo.load_config("rwkv4-tiny")).eval()
    their_state = theirs.state_dict()
    ours.load_state_dict({name: their_state[_hf_name(name)] for name in ours.state_dict()})
    ids = torch.randint(0, 256, (2, 17))
    assert_close("logits", theirs(ids).logits, ours(ids).logits, 1e-5)


def test_rwkv4_169m_config_has_the_pile_169m_tensors():
    config = _hf_config(vocab_size=50277, hidden_size=768, num_hidden_layers=12,
                        attention_hidden_size=768, intermediate_size=3072)
    with torch.device("meta"):
        theirs = RwkvForCausalLM(config)
        ours = zoo.ZooForCausalLM(zoo.load_config("rwkv4-169m"))
    their_shapes = {n: tuple(t.shape) for n, t in theirs.state_dict().items()}
    our_shapes = {_hf_name(n): tuple(t.shape) for n, t in ours.state_dict().items()}
    assert our_shapes == their_shapes
    assert 169e6 < sum(p.numel() for p in ours.parameters()) < 170e6


@pytest.mark.parametrize("name", ["rwkv4-tiny", "rwkv6-tiny"])
@torch.no_grad()
def test_tiny_model_decodes_token_by_token_as_the_full_forward(name):
    torch.manual_seed(0)
    model = zoo.ZooForCausalLM(zoo.load_config(name)).eval()
    ids = torch.randint(0, 256, (2, 13))
    full = model(ids).logits
    out = model(ids[:, :5], use_cache=True)
    pieces, cache = [out.logits], out.cache
    for t in range(5, 13):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        pieces.append(out.logits)
        cache = out.cache
    assert_close(f"{name} logits", full, torch.cat(pieces, 1), 1e-4)
    # bounded: the cache after 13 tokens is the size declared for any length
    layer = model.model.layers[0]
    per_layer = layer.mixer.state_size(10**6) + layer.ffn.state_size(10**6)
    assert cache.nbytes() == 2 * per_layer


@pytest.mark.parametrize("name", ["rwkv4-tiny", "rwkv6-tiny"])
def test_tiny_model_trains(name):
    torch.manual_seed(0)
    model = zoo.ZooForCausalLM(zoo.load_config(name)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # a repeating pattern: predictable from the bytes before, so the loss can fall far
    pattern = torch.randint(0, 256, (12,))
    ids = torch.stack([pattern.roll(-s).repeat(4) for s in range(4)])  # (4, 48)
    losses = []
    for _ in range(30):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("name,rows", [("rwkv-train-step", 6), ("rwkv-decode", 6),
                                       ("wkv4-op", 4)])
def test_bench_entries_run_quick(name, rows, tmp_path):
    from zoo.app.bench import BenchOptions, load_entries, run_bench

    load_entries()
    options = BenchOptions(quick=True, repeats=1, warmup=0, out_dir=tmp_path)
    record = run_bench(name, options, plot=False)
    assert len(record["rows"]) == rows
    timings = [v for row in record["rows"] for k, v in row.items() if k.endswith("ms")
               or k.endswith("ms_per_token")]
    assert timings and all(t > 0 for t in timings)
    if name == "rwkv-decode":  # bounded states do not grow with the context; attention's does
        by_config = {}
        for row in record["rows"]:
            by_config.setdefault(row["config"], set()).add(row["state_bytes"])
        assert len(by_config["rwkv4-tiny"]) == len(by_config["rwkv6-tiny"]) == 1
        assert len(by_config["attention-tiny"]) == 2
