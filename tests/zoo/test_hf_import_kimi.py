"""zoo.from_hf for transformers' Kimi Linear: KDA and MLA layers, a dense first layer and MoE
with DeepSeek-V3's sigmoid router become a zoo stack with the same logits and the same greedy
generations; its router equals transformers' MoE block and names its bad options; what zoo
cannot express is refused by name; kimi-linear-tiny has a transformers peer of its own shape."""

import pytest
import torch
from transformers import KimiLinearConfig, KimiLinearForCausalLM

import zoo
from zoo.hf_import import UnsupportedCheckpointError, convert_config
from zoo.layers.mla import MultiHeadLatentAttention
from zoo.layers.moe import MoE
from zoo.testing import assert_close, relative_error

VOCAB = 120


def _kimi_config(**overrides) -> KimiLinearConfig:
    fields = dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=12, intermediate_size=96, moe_intermediate_size=32,
        num_experts=8, num_experts_per_token=2, num_shared_experts=1, rms_norm_eps=1e-5,
        routed_scaling_factor=2.446, initializer_range=0.05, first_k_dense_replace=1,
        linear_attn_config={"kda_layers": [1, 2, 4], "full_attn_layers": [3], "head_dim": 16,
                            "num_heads": 4, "short_conv_kernel_size": 4},
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return KimiLinearConfig(**{**fields, **overrides})


def _kimi(**overrides) -> KimiLinearForCausalLM:
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(_kimi_config(**overrides)).eval()
    with torch.no_grad():  # norms off one and expert biases off zero, so a misplaced one shows
        for name, tensor in model.state_dict().items():
            if name.endswith("norm.weight"):
                tensor.add_(0.1 * torch.randn_like(tensor))
            if name.endswith("e_score_correction_bias"):
                tensor.copy_(0.1 * torch.randn_like(tensor))
    return model


LAYOUTS = {
    "plain": {},
    # a low-rank query, biases, grouped routing, two shared experts, two dense layers, another
    # norm epsilon (for the KDA layers' output norm too)
    "grouped": dict(q_lora_rank=24, attention_bias=True, num_expert_group=4, topk_group=2,
                    num_shared_experts=2, first_k_dense_replace=2, moe_renormalize=False,
                    rms_norm_eps=1e-6),
    # no shared experts: transformers still holds zero-width tensors for them
    "unshared": dict(num_shared_experts=0),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@torch.no_grad()
def test_kimi_linear_directory_imports_with_equal_logits_and_generation(tmp_path, layout):
    hf = _kimi(**LAYOUTS[layout])
    hf.save_pretrained(tmp_path)
    model = zoo.from_hf(str(tmp_path))
    dense = hf.config.mlp_layer_types.count("dense")
    assert model.config.describe_layers() == (
        [f"kda + {'swiglu' if i < dense else 'moe'}" for i in range(2)]
        + ["mla + moe", "kda + moe"])
    biases = [(f"model.layers.{i}.mlp.gate.e_score_correction_bias",
               model.model.layers[i].ffn.expert_bias.bias) for i in range(dense, 4)]
    for name, bias in biases:
        assert torch.equal(hf.state_dict()[name], bias), name
    ids = torch.randint(3, VOCAB, (2, 21), generator=torch.Generator().manual_seed(1))
    assert relative_error(hf(ids).logits, model(ids).logits) <= 1e-5
    prompt = ids[:1, :6]
    expected = hf.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    got = model.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("groups,top_groups", [(1, 1), (4, 2)])
@torch.no_grad()
def test_moe_with_kimi_router_equals_transformers_kimi_linear_moe_block(groups, top_groups):
    from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearMoE

    config = _kimi_config(num_expert_group=groups, topk_group=top_groups)
    torch.manual_seed(0)
    block = KimiLinearMoE(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.2)
        # biases as large as the scores' spread: they change which experts are chosen, so
        # weights taken from the biased scores would show
        block.gate.e_score_correction_bias.copy_(0.3 * torch.randn(8))
    moe = MoE(64, n_experts=8, top_k=2, hidden_size=32, n_shared_experts=1,
              normalize_weights=True, router_scoring="sigmoid", score_correction_bias=True,
              n_expert_groups=groups, top_k_groups=top_groups, routed_scaling_factor=2.446,
              backend="torch").eval()
    state = dict(block.state_dict())
    state["expert_bias.bias"] = state.pop("gate.e_score_correction_bias")
    moe.load_state_dict(state, strict=True)
    x = torch.randn(3, 11, 64)
    y, _ = moe(x)
    assert_close("moe vs KimiLinearMoE", block(x), y, 1e-5)
    unbiased = MoE(64, n_experts=8, top_k=2, hidden_size=32, n_shared_experts=1,
                   normalize_weights=True, router_scoring="sigmoid",
                   n_expert_groups=groups, top_k_groups=top_groups,
                   routed_scaling_factor=2.446, backend="torch").eval()
    unbiased.load_state_dict(state, strict=False)
    assert relative_error(y, unbiased(x)[0]) > 1e-2, "the expert bias changed no choice"


def test_the_expert_bias_stays_float32_through_a_cast():
    moe = MoE(64, n_experts=8, top_k=2, router_scoring="sigmoid", score_correction_bias=True)
    with torch.no_grad():
        moe.expert_bias.bias.copy_(torch.tensor([1 / 3, 0.1, 1e-3, 0.7, 0.0, 0.2, 0.3, 0.4]))
    exact = moe.expert_bias.bias.clone()
    low = moe.to(torch.bfloat16)
    assert low.gate.weight.dtype == torch.bfloat16
    assert low.expert_bias.bias.dtype == torch.float32 and torch.equal(low.expert_bias.bias, exact)


@pytest.mark.parametrize("options,match", [
    ({"router_scoring": "relu"},
     r"ffn.router_scoring='relu' is not one of \('softmax', 'sigmoid'\)"),
    ({"n_expert_groups": 3}, r"moe: n_experts=8 is not divisible by n_expert_groups=3"),
    ({"n_expert_groups": 2, "top_k_groups": 3}, r"moe: top_k_groups=3 must be in \[1, "
                                                r"n_expert_groups=2\]"),
    ({"n_expert_groups": 8}, r"moe: n_expert_groups=8 leaves 1 expert per group"),
    ({"n_expert_groups": 4, "top_k_groups": 1, "top_k": 3},
     r"moe: top_k=3 exceeds the 2 experts of top_k_groups=1 groups of 2"),
    ({"routed_scaling_factor": 0.0}, r"ffn.routed_scaling_factor=0.0 must be a finite number > 0"),
])
def test_bad_router_options_are_named(options, match):
    from zoo.layers import build_ffn

    with pytest.raises(ValueError, match=match):
        build_ffn({"type": "moe", "n_experts": 8, "top_k": 2, **options}, 64)


@pytest.mark.parametrize("overrides,match", [
    (dict(hidden_act="gelu"), r"kimi_linear: hidden_act='gelu' is not supported \(only 'silu'\)"),
    (dict(num_key_value_heads=2), r"kimi_linear: num_key_value_heads=2 != num_attention_heads=4"),
    (dict(mla_use_nope=False), r"kimi_linear: mla_use_nope=False is not supported"),
    (dict(moe_router_activation_func="softmax"),
     r"kimi_linear: moe_router_activation_func='softmax' is not supported \(only 'sigmoid'\)"),
    (dict(layer_types=["linear_attention"] * 2 + ["sliding_attention", "full_attention"]),
     r"kimi_linear: layer_types\[2\]='sliding_attention' is not supported; supported: "
     r"\['full_attention', 'linear_attention'\]"),
])
def test_what_zoo_cannot_express_is_refused_by_name(overrides, match):
    with pytest.raises(UnsupportedCheckpointError, match=match):
        convert_config(_kimi_config(**overrides))


@torch.no_grad()
def test_kimi_linear_tiny_has_a_transformers_peer_of_its_own_shape():
    from zoo.app.bench.decode import transformers_peer

    config = zoo.load_config("kimi-linear-tiny")
    label, peer = transformers_peer(config)
    assert label == "KimiLinearForCausalLM"
    imported = zoo.from_hf(peer.eval()).config
    # what the import spells out that kimi-linear-tiny leaves to the defaults
    implied = {"kda": {"norm_eps": 1e-5}, "mla": {"q_lora_rank": None, "attention_bias": False},
               "moe": {"expert_type": "swiglu", "n_expert_groups": 1, "top_k_groups": 1},
               "swiglu": {}}
    for i in range(config.n_layers):
        for want, got in zip(config.layer_spec(i), imported.layer_spec(i)):
            want = {**want, **implied[want["type"]]}
            for loss in ("aux_loss_coef", "z_loss_coef"):  # transformers' Kimi adds no aux loss
                want.pop(loss, None)
                got.pop(loss, None)
            assert got == want, f"layer {i}"
    # transformers' Kimi Linear cannot decode without an attention layer: no KDA-only peer
    assert transformers_peer(zoo.load_config("kda-tiny")) is None


@torch.no_grad()
def test_kimi_linear_tiny_caches_the_latent_in_its_mla_layer():
    model = zoo.ZooForCausalLM(zoo.load_config("kimi-linear-tiny")).eval()
    mixers = [block.mixer for block in model.model.layers]
    assert [isinstance(m, MultiHeadLatentAttention) for m in mixers] == [False] * 3 + [True]
    cache = model.new_cache()
    model(torch.randint(0, 256, (1, 50)), cache=cache, use_cache=True)
    latent = cache.layers[3][0]
    assert latent.nbytes() == 50 * (32 + 8) * 4
