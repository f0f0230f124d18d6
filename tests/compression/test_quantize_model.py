"""quantize_model on every family: each quantised layer computes what its dequantised weight
does inside the model, what stays float stays float, a folder round-trips bit-exactly through
save_pretrained / from_pretrained, and decoding (eager and compiled) runs on the result."""

import copy
import json

import pytest
import safetensors.torch
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import zoo
from zoo.compression import (
    CompressionError,
    QuantizedLinear,
    decode_read_bytes,
    linear_targets,
    logical_parameters,
    quantize_model,
    quantized_layers,
    weight_bytes,
)
from zoo.config import ConfigError
from zoo.infer import generate
from zoo.infer.compiled import compiled_decode_step
from zoo.infer.step import decode_step
from zoo.layers.hyena import Hyena
from zoo.model import SavedWeightsError
from zoo.testing import assert_close

TINY = [name for name in zoo.shipped_configs() if name.endswith("-tiny")]
FORMATS = [("int8", None), ("int4", 32)]


def _model(name: str, seed: int = 0) -> zoo.ZooForCausalLM:
    torch.manual_seed(seed)
    return zoo.ZooForCausalLM(zoo.load_config(name)).eval()


def _narrow_layers(model: nn.Module, group_size: int | None) -> list[str]:
    """Skip patterns for the layers a group size does not divide (low-rank projections)."""
    if group_size is None:
        return []
    return sorted({f"*.{name.rpartition('.')[2]}" for name, linear in linear_targets(model)
                   if linear.in_features % group_size})


def _float_twin(model: nn.Module) -> nn.Module:
    """A copy with every QuantizedLinear replaced by an nn.Linear holding its dequantised
    weight: the reference a quantised model must equal up to summation order."""
    twin = copy.deepcopy(model)
    for name, module in quantized_layers(twin):
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(module.dequantize())
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        parent, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, child, linear)
    return twin


@pytest.mark.parametrize(("weights", "group_size"), FORMATS)
@pytest.mark.parametrize("name", TINY)
@torch.no_grad()  # a MoE keeps its last auxiliary loss, which deepcopy refuses with a graph
def test_every_family_equals_its_dequantised_float_twin(name, weights, group_size):
    model = _model(name)
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    section = quantize_model(model, weights, group_size, _narrow_layers(model, group_size))
    assert [n for n, _ in quantized_layers(model)] == section["modules"]
    assert not [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                and n in section["modules"]]
    logits = model(ids).logits
    assert_close(f"{name} {weights}", _float_twin(model)(ids).logits, logits, 1e-5)


def test_moe_experts_and_routers_stay_float():
    model = _model("moe-tiny")
    quantize_model(model, "int8")
    for block in model.model.layers:
        moe = block.ffn
        if hasattr(moe, "experts"):
            assert type(moe.gate) is not QuantizedLinear
            assert all(p.is_floating_point() for p in moe.experts.parameters())


def test_hyenas_filter_network_stays_float():
    model = _model("hyena-tiny")
    quantize_model(model, "int4", 32)
    hyenas = [b.mixer for b in model.model.layers if isinstance(b.mixer, Hyena)]
    assert hyenas and all(isinstance(layer, nn.Linear) for h in hyenas
                          for layer in h.filter_ffn if not hasattr(layer, "freq"))
    assert isinstance(hyenas[0].in_proj, QuantizedLinear)


def test_a_tied_head_is_untied_and_the_embedding_stays_a_float_table():
    model = _model("attention-tiny")
    assert model.config.tie_word_embeddings
    table = model.model.embed_tokens.weight.detach().clone()
    quantize_model(model, "int8")
    assert not model.config.tie_word_embeddings
    assert isinstance(model.lm_head, QuantizedLinear)
    assert torch.equal(model.model.embed_tokens.weight, table)
    assert_close("head", table, model.lm_head.dequantize(), 1 / 127)


def test_weight_bytes_count_codes_scales_and_the_logical_weights():
    model = _model("attention-tiny")
    params, vocab, d = logical_parameters(model), model.config.vocab_size, model.config.d_model
    quantize_model(model, "int4", 32)
    assert logical_parameters(model) == params + vocab * d  # the untied head counts now
    layers = quantized_layers(model)
    codes = sum(m.in_features * m.out_features // 2 for _, m in layers)
    scales = sum(2 * 4 * m.out_features * m.in_features // 32 for _, m in layers)
    rest = sum(p.numel() * 4 for n, p in model.named_parameters()
               if not n.endswith((".qweight", ".scale", ".zero")))
    assert weight_bytes(model) == codes + scales + rest
    # a step reads one row of the (now untied) embedding table
    assert decode_read_bytes(model) == weight_bytes(model) - (vocab - 1) * d * 4
    assert weight_bytes(model, torch.bfloat16) == codes + scales // 2 + rest // 2


def test_errors_name_the_argument_and_the_layer():
    with pytest.raises(CompressionError, match=r"group_size=32: does not divide the input width "
                       r"4 of model\.layers\.0\.mixer\.dt_proj; .* \(skip '\*\.dt_proj'"):
        quantize_model(_model("mamba-tiny"), "int4", 32)
    with pytest.raises(CompressionError, match=r"weights='int3': allowed: int8, int4"):
        quantize_model(_model("attention-tiny"), "int3")
    with pytest.raises(CompressionError, match=r"group_size=32: int8 is per output channel"):
        quantize_model(_model("attention-tiny"), "int8", 32)
    with pytest.raises(CompressionError, match=r"group_size=48: int4 takes 32, 64, 128"):
        quantize_model(_model("attention-tiny"), "int4", 48)
    with pytest.raises(CompressionError, match=r"skip='\*\.nope': matches no linear layer"):
        quantize_model(_model("attention-tiny"), "int8", skip=["*.nope"])
    model = _model("attention-tiny")
    quantize_model(model, "int8")
    with pytest.raises(CompressionError, match=r"quantised already \(int8\)"):
        quantize_model(model, "int4", 32)
    nothing_left = _model("attention-tiny")
    with pytest.raises(CompressionError, match=r"no linear layer to quantise"):
        quantize_model(nothing_left, "int8", skip=["*"])


@pytest.mark.parametrize(("weights", "group_size"), FORMATS)
@pytest.mark.parametrize("load", [zoo.ZooForCausalLM.from_pretrained,
                                  AutoModelForCausalLM.from_pretrained],
                         ids=["ZooForCausalLM", "AutoModelForCausalLM"])
def test_save_and_load_round_trip_bit_exactly(tmp_path, load, weights, group_size):
    model = _model("attention-tiny")
    quantize_model(model, weights, group_size)
    model.save_pretrained(tmp_path)
    loaded = load(tmp_path).eval()
    saved, got = model.state_dict(), loaded.state_dict()
    assert saved.keys() == got.keys()
    for key in saved:
        assert saved[key].dtype == got[key].dtype and torch.equal(saved[key], got[key]), key
    ids = torch.randint(0, 256, (1, 9))
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_the_saved_layout_is_the_documented_one(tmp_path):
    model = _model("attention-tiny")
    quantize_model(model, "int4", 32)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    section = config["quantization"]
    assert section["weights"] == "int4" and section["group_size"] == 32
    assert section["method"] == "rtn" and "lm_head" in section["modules"]
    assert config["tie_word_embeddings"] is False
    tensors = safetensors.torch.load_file(tmp_path / "model.safetensors")
    assert tensors["lm_head.qweight"].dtype == torch.uint8
    assert tensors["lm_head.qweight"].shape == (256, 32)
    assert tensors["lm_head.scale"].shape == tensors["lm_head.zero"].shape == (256, 2)
    assert "lm_head.weight" not in tensors
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32


def test_loading_in_bfloat16_keeps_the_codes(tmp_path):
    model = _model("attention-tiny")
    quantize_model(model, "int8")
    model.save_pretrained(tmp_path)
    loaded = zoo.ZooForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.lm_head.qweight.dtype == torch.int8
    assert torch.equal(loaded.lm_head.qweight, model.lm_head.qweight)
    assert loaded.lm_head.scale.dtype == torch.bfloat16


def test_a_missing_scale_is_a_strict_loading_error_naming_it(tmp_path):
    model = _model("attention-tiny")
    quantize_model(model, "int8")
    model.save_pretrained(tmp_path)
    tensors = safetensors.torch.load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.ffn.down_proj.scale"]
    safetensors.torch.save_file(tensors, tmp_path / "model.safetensors",
                                metadata={"format": "pt"})
    with pytest.raises(SavedWeightsError, match=r"1 missing \(model\.layers\.1\.ffn\.down_proj"
                       r"\.scale\)"):
        zoo.ZooForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize(("section", "message"), [
    ({"weights": "int2", "group_size": None, "method": "rtn", "modules": ["lm_head"]},
     r"quantization\.weights='int2'"),
    ({"weights": "int4", "group_size": 24, "method": "rtn", "modules": ["lm_head"]},
     r"quantization\.group_size=24"),
    ({"weights": "int8", "group_size": None, "method": "awq", "modules": ["lm_head"]},
     r"quantization\.method='awq'"),
    ({"weights": "int8", "group_size": None, "method": "rtn", "modules": []},
     r"quantization\.modules must be a non-empty list"),
    ({"weights": "int8", "group_size": None, "method": "rtn", "modules": ["x"], "bits": 8},
     r"quantization has unknown key 'bits'"),
])
def test_a_bad_quantization_section_is_a_config_error_naming_the_field(section, message):
    with pytest.raises(ConfigError, match=message):
        zoo.load_config("attention-tiny", quantization=section, tie_embeddings=False)


def test_a_tied_config_cannot_quantise_its_head():
    section = {"weights": "int8", "group_size": None, "method": "rtn", "modules": ["lm_head"]}
    with pytest.raises(ConfigError, match=r"tie_word_embeddings must be false"):
        zoo.load_config("attention-tiny", quantization=section)


def test_a_section_naming_no_linear_layer_is_an_error_naming_it():
    section = {"weights": "int8", "group_size": None, "method": "rtn",
               "modules": ["model.layers.0.mixer_norm"]}
    config = zoo.load_config("attention-tiny", quantization=section)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mixer_norm', which is not a "
                       r"linear layer"):
        zoo.ZooForCausalLM(config)


@pytest.fixture(scope="module")
def trained_tiny() -> zoo.ZooForCausalLM:
    """attention-tiny trained for 200 steps on arithmetic progressions (t -> t + stride mod
    256): confident predictions, so a greedy comparison is not a coin toss on random logits."""
    torch.manual_seed(0)
    model = zoo.ZooForCausalLM(zoo.load_config("attention-tiny"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(200):
        start, stride = torch.randint(0, 256, (16, 1)), torch.randint(1, 4, (16, 1))
        ids = (start + stride * torch.arange(32)) % 256
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


PROMPTS = [[5, 7, 9, 11], [100, 101, 102], [250, 253]]


def test_greedy_tokens_of_int8_equal_the_float_models(trained_tiny):
    """attention-tiny, trained: int8's logit error stays far below the float model's top-1
    margin along the way (measured 0.07 against 1.9), so greedy decoding agrees token for token.
    """
    quantised = copy.deepcopy(trained_tiny)
    quantize_model(quantised, "int8")
    expected = generate(trained_tiny, PROMPTS, max_new_tokens=24)
    got = generate(quantised, PROMPTS, max_new_tokens=24)
    assert got.tokens == expected.tokens
    with torch.no_grad():
        ids = torch.tensor([PROMPTS[0] + expected.tokens[0]])
        reference, logits = trained_tiny(ids).logits, quantised(ids).logits
    top = reference.topk(2, dim=-1).values
    margin = float((top[..., 0] - top[..., 1]).min())
    error = float((reference - logits).abs().max())
    assert error < margin / 4, f"int8 logit error {error:.3f} vs top-1 margin {margin:.3f}"


@pytest.mark.slow
@pytest.mark.parametrize(("weights", "group_size"), FORMATS)
@torch.no_grad()
def test_the_compiled_step_equals_the_eager_step_on_the_cpu_kernels(
        trained_tiny, weights, group_size):
    """bfloat16, where the CPU kernels run inside the graph too. The logits agree to bf16's
    rounding (inductor rounds fused ops once, eager each op); int8 keeps its greedy tokens."""
    quantised = copy.deepcopy(trained_tiny)
    quantize_model(quantised, weights, group_size)
    quantised = quantised.to(torch.bfloat16)
    ids = torch.tensor([PROMPTS[0]])
    caches = [quantised.new_cache(), quantised.new_cache()]
    for cache in caches:
        quantised(ids, cache=cache)
        cache.reserve(ids.shape[1] + 4)
    layout, tensors, ints = caches[1].flatten()
    step = compiled_decode_step(quantised, layout)
    token = torch.tensor([[13]])
    for _ in range(3):
        eager = decode_step(quantised, token, caches[0])
        compiled, tensors, ints = step(token, tensors, ints)
        assert_close(f"{weights} logits", eager.float(), compiled.float(), 3e-2)
        token = eager.argmax(dim=-1, keepdim=True)
    if weights == "int8":
        eager_run = generate(quantised, PROMPTS, max_new_tokens=12)
        for mode in (True, "inductor"):
            compiled_run = generate(quantised, PROMPTS, max_new_tokens=12, compile=mode)
            assert compiled_run.tokens == eager_run.tokens
