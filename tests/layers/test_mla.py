"""The mla mixer: equal to transformers' Kimi Linear MLA layer on the same weights, whole and
decoded from its cache; decoding absorbs kv_b_proj instead of expanding the cache; the cache
holds the latent per token and nothing per head; bad options are named. The state contract
itself is checked in test_contract.py."""

import pytest
import torch

from zoo.layers import build_mixer
from zoo.layers.mla import MultiHeadLatentAttention
from zoo.testing import assert_close

D_MODEL = 64
SIZES = {"n_heads": 4, "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
         "v_head_dim": 12}


def _perturb(module):
    """Every parameter moved off its initial value (norm weights off one), so that a parameter
    used in the wrong place shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module


def _kimi_layer(q_lora_rank, attention_bias):
    from transformers import KimiLinearConfig
    from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearAttention

    config = KimiLinearConfig(
        hidden_size=D_MODEL, num_hidden_layers=1, num_attention_heads=SIZES["n_heads"],
        num_key_value_heads=SIZES["n_heads"], q_lora_rank=q_lora_rank,
        kv_lora_rank=SIZES["kv_lora_rank"], qk_nope_head_dim=SIZES["qk_nope_head_dim"],
        qk_rope_head_dim=SIZES["qk_rope_head_dim"], v_head_dim=SIZES["v_head_dim"],
        attention_bias=attention_bias,
    )
    config._attn_implementation = "sdpa"  # causal without a mask (eager would attend ahead)
    torch.manual_seed(0)
    return _perturb(KimiLinearAttention(config, layer_idx=0).eval())


def _zoo_twin(layer, q_lora_rank, attention_bias):
    mixer = MultiHeadLatentAttention(D_MODEL, q_lora_rank=q_lora_rank,
                                     attention_bias=attention_bias, **SIZES).eval()
    mixer.load_state_dict(layer.state_dict(), strict=True)  # transformers' names and shapes
    return mixer


def _in_pieces(mixer, x, cuts):
    state, outputs = None, []
    bounds = [0, *cuts, x.shape[1]]
    for start, end in zip(bounds[:-1], bounds[1:]):
        y, state = mixer(x[:, start:end], state)
        outputs.append(y)
    return torch.cat(outputs, dim=1), state


LAYOUTS = [(None, False), (24, False), (24, True)]


@pytest.mark.parametrize("q_lora_rank,attention_bias", LAYOUTS)
@torch.no_grad()
def test_equals_transformers_kimi_linear_attention(q_lora_rank, attention_bias):
    layer = _kimi_layer(q_lora_rank, attention_bias)
    mixer = _zoo_twin(layer, q_lora_rank, attention_bias)
    x = torch.randn(2, 23, D_MODEL)
    want, _ = layer(x, attention_mask=None)
    # whole; a prompt, a chunk, then one token at a time (the absorbed decoding step)
    for label, cuts in [("whole", []), ("decoded", [9, 14, *range(15, 23)])]:
        y, state = _in_pieces(mixer, x, cuts)
        assert_close(f"mla {label} vs KimiLinearAttention", want, y, 1e-5)
        assert state.length == 23


@torch.no_grad()
def test_absorbed_step_equals_the_expanded_form_in_float64():
    mixer = _perturb(MultiHeadLatentAttention(D_MODEL, q_lora_rank=24, **SIZES).double())
    prompt, token = torch.randn(2, 11, D_MODEL).double(), torch.randn(2, 1, D_MODEL).double()
    _, state = mixer(prompt)
    absorbed, _ = mixer(token, state.clone())
    with torch.enable_grad():  # a query that needs gradients takes the expanded form
        expanded, _ = mixer(token.requires_grad_(), state.clone())
    assert_close("absorbed vs expanded decoding step", expanded.detach(), absorbed, 1e-12)


@torch.no_grad()
def test_decoding_never_expands_the_cache_through_kv_b_proj():
    mixer = _perturb(MultiHeadLatentAttention(D_MODEL, **SIZES).eval())
    calls = []
    mixer.kv_b_proj.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    _, state = mixer(torch.randn(1, 30, D_MODEL))
    assert calls == [torch.Size([1, 30, SIZES["kv_lora_rank"]])]  # the prefill expands once
    for _ in range(3):
        _, state = mixer(torch.randn(1, 1, D_MODEL), state)
    assert len(calls) == 1, f"decoding steps expanded the latents: {calls[1:]}"


@torch.no_grad()
def test_the_cache_holds_the_normalised_latent_and_shared_key_per_token():
    mixer = _perturb(MultiHeadLatentAttention(D_MODEL, **SIZES).eval())
    x = torch.randn(2, 37, D_MODEL)
    _, state = mixer(x)
    C, R = SIZES["kv_lora_rank"], SIZES["qk_rope_head_dim"]
    c, k_rope = (x @ mixer.kv_a_proj_with_mqa.weight.T).split([C, R], dim=-1)
    c = c / torch.sqrt(c.square().mean(-1, keepdim=True) + 1e-6) * mixer.kv_a_layernorm.weight
    assert_close("cached latent", c, state.filled()[..., :C], 1e-6)
    assert_close("cached shared key part", k_rope, state.filled()[..., C:], 1e-6)
    per_token = (C + R) * 4  # float32
    assert state.nbytes() == mixer.state_size(37) == 37 * per_token
    assert mixer.state_size(1000, torch.bfloat16) == 1000 * (C + R) * 2
    # what softmax attention with the same heads would cache: a key and a value per head
    full_kv = 2 * SIZES["n_heads"] * (SIZES["qk_nope_head_dim"] + R) * 4
    assert per_token < full_kv / 4


@pytest.mark.parametrize("spec,match", [
    ({"type": "mla", "qk_rope_head_dim": -1}, r"mixer.qk_rope_head_dim=-1 must be an integer >= 0"),
    ({"type": "mla", "kv_lora_rank": 0}, r"mixer.kv_lora_rank=0 must be an integer >= 1 or null"),
    ({"type": "mla", "n_heads": 128}, r"mla: n_heads=128 > d_model=64 leaves no default head"),
    ({"type": "mla", "rope_theta": 10000.0}, r"mixer 'mla' has no option 'rope_theta'"),
])
def test_bad_options_are_named(spec, match):
    with pytest.raises(ValueError, match=match):
        build_mixer(spec, D_MODEL)
