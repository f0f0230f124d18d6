"""zoo.from_hf on Qwen3-Next and Qwen3.5 (transformers' Qwen3NextForCausalLM,
Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM): small random models saved to disk come back as zoo
hybrids of gated_deltanet and gated attention layers, dense and MoE FFNs, with transformers'
logits and greedy tokens; what zoo cannot express is refused by name."""

import pytest
import torch

import zoo
from zoo.hf_import import UnsupportedCheckpointError, convert_config, load_hf_config
from zoo.testing import assert_close, relative_error

VOCAB = 120
# two query-key heads serving four value heads, as Qwen3-Next's 16 serve 32
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
             linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
           shared_expert_intermediate_size=48)


def _perturbed(model):
    """Every weight moved off its initial value: the zero-centred norms' zeros, the gated
    norm's ones and the router's and experts' small values would hide a wrong mapping."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _qwen3_next(**options):
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    torch.manual_seed(0)
    config = Qwen3NextConfig(**{**SHAPE, "intermediate_size": 96, "num_hidden_layers": 4,
                                **MOE, **options})
    return _perturbed(Qwen3NextForCausalLM(config))


def _qwen3_5(moe: bool, **options):
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig
    from transformers.models.qwen3_5_moe import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    torch.manual_seed(0)
    if moe:
        config = Qwen3_5MoeTextConfig(**{**SHAPE, "num_hidden_layers": 4, **MOE, **options})
        return _perturbed(Qwen3_5MoeForCausalLM(config))
    config = Qwen3_5TextConfig(**{**SHAPE, "intermediate_size": 96, "num_hidden_layers": 4,
                                  **options})
    return _perturbed(Qwen3_5ForCausalLM(config))


def _assert_same_logits_and_tokens(hf, model, new_tokens=16):
    ids = torch.randint(0, VOCAB, (2, 19))
    with torch.no_grad():
        assert relative_error(hf(ids).logits, model(ids).logits) <= 1e-5
    prompt = ids[:1, :5]
    expected = hf.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=new_tokens, do_sample=False),
                       expected)


@pytest.mark.parametrize("options,layers", [
    # layers 0 and 2 Gated DeltaNet, 1 and 3 attention; layer 1 dense (mlp_only_layers)
    ({"layer_types": ["linear_attention", "full_attention"] * 2, "mlp_only_layers": [1]},
     ["gated_deltanet + moe", "attention + swiglu", "gated_deltanet + moe", "attention + moe"]),
    # Qwen3-Next's 3:1 default; MoE every second layer; top-k weights as the router gives them
    ({"decoder_sparse_step": 2, "norm_topk_prob": False, "tie_word_embeddings": True},
     ["gated_deltanet + swiglu", "gated_deltanet + moe", "gated_deltanet + swiglu",
      "attention + moe"]),
])
def test_qwen3_next_directory_imports_with_equal_logits_and_generation(tmp_path, options, layers):
    hf = _qwen3_next(**options)
    hf.save_pretrained(tmp_path)
    model = zoo.from_hf(str(tmp_path))
    assert model.config.describe_layers() == layers
    _assert_same_logits_and_tokens(hf, model)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_qwen3_5_directory_imports_with_equal_logits_and_generation(tmp_path, moe):
    # value heads twice the key heads' width, and attention biases (q, its gate, k, v, o)
    hf = _qwen3_5(moe, linear_value_head_dim=32, attention_bias=True)
    hf.save_pretrained(tmp_path)
    model = zoo.from_hf(str(tmp_path))
    ffn = "moe" if moe else "swiglu"
    kinds = [f"gated_deltanet + {ffn}"] * 3 + [f"attention + {ffn}"]
    assert model.config.describe_layers() == kinds
    assert model.config.mixer["value_factor"] == 2
    _assert_same_logits_and_tokens(hf, model)


def test_a_qwen3_5_release_with_a_vision_tower_imports_its_text_model(tmp_path):
    """Qwen3.5's releases are Qwen3_5ForConditionalGeneration folders: zoo takes the text
    model transformers' AutoModelForCausalLM loads from them, and `zoo info` reads them."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    torch.manual_seed(0)
    text = {**SHAPE, "intermediate_size": 96, "num_hidden_layers": 4}
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
    hf = _perturbed(Qwen3_5ForConditionalGeneration(
        Qwen3_5Config(text_config=text, vision_config=vision)))
    hf.save_pretrained(tmp_path)
    model = zoo.from_hf(str(tmp_path))
    assert convert_config(load_hf_config(str(tmp_path)))[0].to_dict() == model.config.to_dict()
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        assert relative_error(hf(input_ids=ids).logits, model(ids).logits) <= 1e-5


@torch.no_grad()
def test_the_imported_cache_path_equals_the_full_forward():
    """Prefill, then one token at a time through the cache: each step's logits are those of
    the whole sequence at that position (KV caches and Gated DeltaNet states carried)."""
    model = zoo.from_hf(_qwen3_next(layer_types=["linear_attention", "full_attention"] * 2))
    ids = torch.randint(0, VOCAB, (2, 15))
    whole = model(ids).logits
    out = model(ids[:, :6], use_cache=True)
    steps, cache = [out.logits], out.cache
    for t in range(6, 15):
        out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
        steps.append(out.logits)
        cache = out.cache
    assert_close("prefill + steps vs whole", whole, torch.cat(steps, dim=1), 1e-5)


def _all_attention():
    return zoo.from_hf(_qwen3_next(num_hidden_layers=2, num_experts=0,
                                   layer_types=["full_attention"] * 2))


def test_a_gated_attention_stack_is_not_sent_to_the_native_step():
    """The native C++ step knows Llama's attention: Qwen3-Next's q/k norms, output gate and
    partial rotary would be dropped there, so the stack takes the compiled step instead."""
    from zoo.infer import native
    from zoo.infer.generate import prefill

    model = _all_attention()
    layout = prefill(model, [[1]]).cache.flatten()[0]
    support = native.native_support(model, layout, 1)
    assert not support and "QwenAttention" in support.reason


@pytest.mark.slow
def test_the_compiled_step_generates_what_transformers_does():
    from zoo.infer import generate

    hf = _qwen3_next(num_hidden_layers=2, num_experts=0, layer_types=["full_attention"] * 2)
    model = zoo.from_hf(hf)
    prompt = [3, 5, 7, 9, 11]
    result = generate(model, [prompt], max_new_tokens=12, compile=True)
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    assert result.tokens[0] == expected[0, len(prompt):].tolist()


@pytest.mark.parametrize("options,match", [
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
     r"qwen3_next: rope_parameters.rope_type='linear' is not supported \(only 'default'\)"),
    ({"hidden_act": "gelu"}, r"qwen3_next: hidden_act='gelu' is not supported \(only 'silu'\)"),
    ({"layer_types": ["linear_attention", "sliding_attention", "linear_attention",
                      "full_attention"]},
     r"qwen3_next: layer_types holds 'sliding_attention'; supported: \['full_attention', "
     r"'linear_attention'\]"),
    ({"linear_value_head_dim": 24},
     r"qwen3_next: linear_value_head_dim=24 is not a multiple of linear_key_head_dim=16"),
])
def test_what_zoo_cannot_express_is_refused_by_name(options, match):
    from transformers import Qwen3NextConfig

    config = Qwen3NextConfig(**{**SHAPE, "intermediate_size": 96, "num_hidden_layers": 4,
                                **MOE, **options})
    with pytest.raises(UnsupportedCheckpointError, match=match):
        convert_config(config)


def test_qwen3_5_refuses_a_rope_scaling_by_name():
    from transformers import Qwen3_5TextConfig

    config = Qwen3_5TextConfig(**{**SHAPE, "num_hidden_layers": 4, "rope_parameters": {
        "rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
        "original_max_position_embeddings": 4096}})
    with pytest.raises(UnsupportedCheckpointError, match=r"qwen3_5: rope_parameters.rope_type="
                       r"'yarn' is not supported"):
        convert_config(config)


def test_the_decode_bench_peer_of_the_hybrid_is_qwen3_next_of_its_shape():
    """`zoo bench decode` times gated-deltanet-hybrid-tiny beside transformers' Qwen3-Next of
    the same stack: imported back, that peer is the hybrid's layers, plus Qwen3-Next's q/k
    norms and output gate on the attention layer."""
    from zoo.app.bench.decode import transformers_peer

    config = zoo.load_config("gated-deltanet-hybrid-tiny")
    label, peer = transformers_peer(config)
    assert label == "Qwen3NextForCausalLM"
    imported = zoo.from_hf(peer.eval()).config
    assert imported.describe_layers() == config.describe_layers()
    assert imported.mixer == {**config.mixer, "value_factor": 1, "norm_eps": config.norm_eps}
    attention = imported.layer_spec(3)[0]
    assert {k: attention[k] for k in ("n_heads", "n_kv_heads", "partial_rotary_factor")} == {
        "n_heads": 4, "n_kv_heads": 2, "partial_rotary_factor": 1.0}
    # transformers cannot generate from a Qwen3-Next without an attention layer
    assert transformers_peer(zoo.load_config("gated-deltanet-tiny")) is None
