"""GGUF's Q8_0 / Q4_0 / Q4_1 blocks as QuantizedLinear layers: read bit-exactly (equal to gguf's
own dequantize), kept quantised on import (`zoo.from_hf(..., quantized=True)`) with weights equal
to the float import's and the same logits, and written by gguf's quantiser for `zoo compress`."""

import numpy as np
import pytest
import torch

import zoo
from zoo.compression import CompressionError, QuantizedLinear, linear_targets
from zoo.compression.gguf_blocks import (
    GGUF_FORMATS,
    gguf_file_blocks,
    quantize_blocks,
    quantize_model_gguf,
    read_blocks,
)
from zoo.compression.targets import replace_module
from zoo.hf_import import UnsupportedCheckpointError
from zoo.testing import relative_error

gguf = pytest.importorskip("gguf")  # installed by `make test` (transformers' GGUF reader)


def _qtype(format: str):
    return getattr(gguf.GGMLQuantizationType, GGUF_FORMATS[format][0])


def _weight(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Weights whose blocks span very different ranges (and one block of zeros)."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(rows, cols)) * np.exp(rng.normal(size=(rows, cols // 32, 1)) * 2
                                                    ).repeat(32, axis=-1).reshape(rows, cols)
    weight[0, :32] = 0.0
    return weight.astype(np.float32)


def _permute_rotary(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter's reordering of q_proj / k_proj rows (transformers undoes it)."""
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:]
                          ).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_llama(path, formats: dict[str, str], vocab: int = 96, d_model: int = 64,
                     n_layers: int = 2, n_heads: int = 4, n_kv_heads: int = 2, ffn: int = 128,
                     tied: bool = True) -> None:
    """A tiny Llama GGUF file whose tensors are stored in `formats` (GGUF tensor kind, e.g.
    "attn_q", "token_embd" -> GGML type name; F32 where unnamed)."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(d_model)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["t", "1"] + [f"t{i}" for i in range(vocab - 2)])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_merges(["t 1"])

    def add(name: str, kind: str, weight: np.ndarray) -> None:
        qtype = getattr(gguf.GGMLQuantizationType, formats.get(kind, "F32"))
        writer.add_tensor(name, gguf.quants.quantize(weight.astype(np.float32), qtype),
                          raw_dtype=qtype)

    kv_rows = d_model // n_heads * n_kv_heads
    add("token_embd.weight", "token_embd", rng.normal(size=(vocab, d_model)))
    if not tied:
        add("output.weight", "output", rng.normal(size=(vocab, d_model)) * 0.2)
    for i in range(n_layers):
        block = f"blk.{i}."
        add(block + "attn_q.weight", "attn_q",
            _permute_rotary(rng.normal(size=(d_model, d_model)) * 0.2, n_heads))
        add(block + "attn_k.weight", "attn_k",
            _permute_rotary(rng.normal(size=(kv_rows, d_model)) * 0.2, n_kv_heads))
        add(block + "attn_v.weight", "attn_v", rng.normal(size=(kv_rows, d_model)) * 0.2)
        add(block + "attn_output.weight", "attn_output",
            rng.normal(size=(d_model, d_model)) * 0.2)
        add(block + "ffn_gate.weight", "ffn_gate", rng.normal(size=(ffn, d_model)) * 0.2)
        add(block + "ffn_up.weight", "ffn_up", rng.normal(size=(ffn, d_model)) * 0.2)
        add(block + "ffn_down.weight", "ffn_down", rng.normal(size=(d_model, ffn)) * 0.2)
        add(block + "attn_norm.weight", "norm", 1 + 0.1 * rng.normal(size=d_model))
        add(block + "ffn_norm.weight", "norm", 1 + 0.1 * rng.normal(size=d_model))
    add("output_norm.weight", "norm", np.ones(d_model))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_tiny_mamba(path, vocab: int = 96, d_model: int = 64, n_layers: int = 2,
                     d_state: int = 16, d_conv: int = 4, dt_rank: int = 4) -> None:
    """A tiny Mamba GGUF file: in_proj Q4_1, x_proj Q8_0, out_proj Q4_0, the table Q8_0; the
    convolution, dt_proj (4 inputs: not whole blocks), A, D and the norms F32."""
    rng = np.random.default_rng(0)
    inner = 2 * d_model
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_context_length(256)
    writer.add_embedding_length(d_model)
    writer.add_block_count(n_layers)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_ssm_conv_kernel(d_conv)
    writer.add_ssm_state_size(d_state)
    writer.add_ssm_time_step_rank(dt_rank)
    writer.add_ssm_inner_size(inner)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["t", "1"] + [f"t{i}" for i in range(vocab - 2)])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_merges(["t 1"])

    def add(name: str, kind: str, weight: np.ndarray) -> None:
        qtype = getattr(gguf.GGMLQuantizationType, kind)
        writer.add_tensor(name, gguf.quants.quantize(np.asarray(weight, np.float32), qtype),
                          raw_dtype=qtype)

    add("token_embd.weight", "Q8_0", rng.normal(size=(vocab, d_model)))
    for i in range(n_layers):
        block = f"blk.{i}."
        add(block + "attn_norm.weight", "F32", 1 + 0.1 * rng.normal(size=d_model))
        add(block + "ssm_in.weight", "Q4_1", rng.normal(size=(2 * inner, d_model)) * 0.2)
        add(block + "ssm_conv1d.weight", "F32", rng.normal(size=(inner, d_conv)) * 0.3)
        add(block + "ssm_conv1d.bias", "F32", rng.normal(size=inner) * 0.1)
        add(block + "ssm_x.weight", "Q8_0", rng.normal(size=(dt_rank + 2 * d_state, inner)) * 0.1)
        add(block + "ssm_dt.weight", "F32", rng.normal(size=(inner, dt_rank)) * 0.3)
        add(block + "ssm_dt.bias", "F32", rng.normal(size=inner) * 0.1 - 2)
        add(block + "ssm_a", "F32", -np.exp(rng.normal(size=(inner, d_state)) * 0.5))
        add(block + "ssm_d", "F32", np.ones(inner))
        add(block + "ssm_out.weight", "Q4_0", rng.normal(size=(d_model, inner)) * 0.1)
    add("output_norm.weight", "F32", np.ones(d_model))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


MIXED = {"token_embd": "Q8_0", "attn_q": "Q4_1", "attn_k": "Q4_0", "attn_v": "Q8_0",
         "attn_output": "Q4_1", "ffn_gate": "Q4_1", "ffn_up": "Q4_0", "ffn_down": "F16"}


# --- blocks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("format", sorted(GGUF_FORMATS))
def test_blocks_written_to_a_file_read_back_as_gguf_dequantizes_them(tmp_path, format):
    weight = _weight(48, 96)
    raw = gguf.quants.quantize(weight, _qtype(format))
    writer = gguf.GGUFWriter(str(tmp_path / "blocks.gguf"), "llama")
    writer.add_tensor("w", raw, raw_dtype=_qtype(format))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    blocks = gguf_file_blocks(tmp_path / "blocks.gguf")["w"]
    expected = torch.from_numpy(gguf.quants.dequantize(raw, _qtype(format)))
    assert blocks.format == format and blocks.shape == (48, 96)
    assert torch.equal(blocks.dequantize(), expected)
    layer = blocks.to_linear()
    assert layer.group_size == 32 and layer.weights == GGUF_FORMATS[format][1]
    assert layer.scale.dtype == torch.float32
    assert torch.equal(layer.dequantize(torch.float32), expected)
    x = torch.randn(3, 96)
    assert relative_error(x @ expected.T, layer(x)) <= 1e-6


def test_q4_nibbles_low_are_the_first_half_of_a_block_high_the_second():
    # one Q4_1 block: d = 1, m = 0.5, byte j = j (low nibble) | (15 - j) << 4 (high nibble)
    header = np.array([1.0, 0.5], dtype=np.float16).view(np.uint8)
    nibbles = np.array([j | (15 - j) << 4 for j in range(16)], dtype=np.uint8)
    blocks = read_blocks(np.concatenate([header, nibbles])[None], "q4_1")
    expected = list(range(16)) + [15 - j for j in range(16)]
    assert blocks.codes[0].tolist() == expected
    assert blocks.dequantize()[0].tolist() == [code + 0.5 for code in expected]
    assert unpack_codes(blocks.to_linear()) == expected


def unpack_codes(layer: QuantizedLinear) -> list[int]:
    return layer.codes()[0].tolist()


def test_q4_0_zero_is_minus_eight_scales_and_q8_0_has_none():
    raw = gguf.quants.quantize(_weight(4, 64), _qtype("q4_0"))
    blocks = read_blocks(raw, "q4_0")
    assert torch.equal(blocks.zero, -8 * blocks.scale)
    assert read_blocks(gguf.quants.quantize(_weight(4, 64), _qtype("q8_0")), "q8_0").zero is None


def test_bad_rows_name_the_format_and_the_shape():
    with pytest.raises(ValueError, match=r"q4_1 rows must be uint8 \(out, blocks \* 20\)"):
        read_blocks(np.zeros((2, 21), np.uint8), "q4_1")
    with pytest.raises(ValueError, match="format='q5_k' is not one of"):
        read_blocks(np.zeros((2, 20), np.uint8), "q5_k")


# --- import with quantized=True ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_llama(path, MIXED)
    return path


def test_import_builds_ggufs_name_map_once_per_architecture(tiny_gguf, monkeypatch):
    # transformers' loader asks for the map once per submodule: seconds per SmolLM2 import
    calls = []
    build = gguf.get_tensor_name_map

    def counted(*args):
        calls.append(args)
        return build(*args)

    monkeypatch.setattr(gguf, "get_tensor_name_map", counted)
    zoo.from_hf(str(tiny_gguf), quantized=True)
    # once for the weights' load and once for the blocks' row map, not once per submodule
    assert 1 <= len(calls) <= 2
    assert gguf.get_tensor_name_map is counted  # put back afterwards


def test_quantized_import_keeps_every_block_and_equals_the_float_import(tiny_gguf):
    float_model = zoo.from_hf(str(tiny_gguf))
    model = zoo.from_hf(str(tiny_gguf), quantized=True)
    section = model.config.quantization
    assert section["method"] == "gguf" and (section["weights"], section["group_size"]) == (
        "int4", 32)
    expected = {"q_proj": "int4", "k_proj": "int4", "v_proj": "int8", "o_proj": "int4",
                "gate_proj": "int4", "up_proj": "int4"}
    floats = dict(float_model.named_modules())
    for name, module in model.named_modules():
        kind = name.rpartition(".")[2]
        if kind == "down_proj":  # F16 in the file: stays float
            assert isinstance(module, torch.nn.Linear)
            assert torch.equal(module.weight, floats[name].weight)
        elif kind in expected or name == "lm_head":
            assert isinstance(module, QuantizedLinear), name
            assert module.weights == expected.get(kind, "int8") and module.group_size == 32
            assert torch.equal(module.dequantize(torch.float32), floats[name].weight), name
    # the Q8_0 table is both the float embedding and the (now untied) int8 head
    assert not model.config.tie_word_embeddings
    assert torch.equal(model.model.embed_tokens.weight, float_model.model.embed_tokens.weight)
    assert section["formats"]["lm_head"] == {"weights": "int8", "group_size": 32}
    ids = torch.tensor([[1, 5, 7, 9, 11, 2, 40]])
    with torch.no_grad():
        assert relative_error(float_model(ids).logits, model(ids).logits) <= 1e-5


def test_quantized_import_keeps_an_untied_heads_own_blocks(tmp_path):
    path = tmp_path / "untied.gguf"
    write_tiny_llama(path, {"token_embd": "F16", "output": "Q4_1", "attn_q": "Q8_0"},
                     tied=False)
    model = zoo.from_hf(str(path), quantized=True)
    float_model = zoo.from_hf(str(path))
    assert isinstance(model.lm_head, QuantizedLinear) and model.lm_head.weights == "int4"
    assert torch.equal(model.lm_head.dequantize(torch.float32), float_model.lm_head.weight)
    assert model.config.quantization["weights"] == "int8"  # the q_proj layers outnumber it
    assert isinstance(model.model.layers[0].mixer.k_proj, torch.nn.Linear)


def test_quantized_import_of_a_mamba_file_keeps_its_blocks(tmp_path):
    path = tmp_path / "mamba.gguf"
    write_tiny_mamba(path)
    float_model = zoo.from_hf(str(path))
    model = zoo.from_hf(str(path), quantized=True)
    mixer = model.model.layers[1].mixer
    assert [(layer.weights, layer.group_size) for layer in (
        mixer.in_proj, mixer.x_proj, mixer.out_proj, model.lm_head)] == [
        ("int4", 32), ("int8", 32), ("int4", 32), ("int8", 32)]
    assert isinstance(mixer.dt_proj, torch.nn.Linear)  # F32 in the file
    floats = dict(float_model.named_modules())
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            assert torch.equal(module.dequantize(torch.float32), floats[name].weight), name
    ids = torch.tensor([[1, 5, 7, 9, 11, 2, 40]])
    with torch.no_grad():
        assert relative_error(float_model(ids).logits, model(ids).logits) <= 1e-5


def test_quantized_import_in_float16_is_exact_and_in_bfloat16_rounds_only_the_scales(
        tiny_gguf):
    exact = zoo.from_hf(str(tiny_gguf), quantized=True)
    for dtype in (torch.float16, torch.bfloat16):
        float_model = zoo.from_hf(str(tiny_gguf), dtype=dtype)
        model = zoo.from_hf(str(tiny_gguf), dtype=dtype, quantized=True)
        # one dtype for every float tensor (what the native decode step takes)
        assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {dtype}
        layer, reference = model.model.layers[1].mixer.q_proj, exact.model.layers[1].mixer.q_proj
        assert torch.equal(layer.qweight, reference.qweight)
        assert torch.equal(layer.scale, reference.scale.to(dtype))
        weight = float_model.model.layers[1].mixer.q_proj.weight
        if dtype == torch.float16:  # GGUF's fp16 scales are float16 values
            assert torch.equal(layer.scale.float(), reference.scale)
            assert torch.equal(layer.dequantize(dtype), weight)
        else:
            assert not torch.equal(layer.scale.float(), reference.scale)
            # d and m each rounded to bfloat16 (unit roundoff 2^-8; codes <= 15), and the
            # reference weight rounded to bfloat16 once
            moved = (reference.zero.abs() + 15 * reference.scale).repeat_interleave(32, 1)
            bound = (moved + weight.float().abs()) * 2 ** -8
            assert ((layer.dequantize(torch.float32) - weight.float()).abs() <= bound).all()


def test_quantized_is_refused_for_a_source_that_is_not_gguf(tmp_path):
    with pytest.raises(UnsupportedCheckpointError, match="quantized=True keeps a GGUF file"):
        zoo.from_hf(str(tmp_path), quantized=True)


def test_quantized_is_refused_for_a_file_with_no_quantised_linear(tmp_path):
    path = tmp_path / "float.gguf"
    write_tiny_llama(path, {"token_embd": "F16"})
    with pytest.raises(UnsupportedCheckpointError,
                       match="float.gguf stores no linear layer as Q8_0, Q4_0 or Q4_1"):
        zoo.from_hf(str(path), quantized=True)


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_quantized_import_equals_its_dequantised_self(smollm2_read_once):
    """The real file. The import checks every kept layer against the float import bit for bit
    (and refuses otherwise; the tiny GGUF files above compare them in the test itself); here,
    what the quantised model computes equals the same model with its layers dequantised."""
    model = zoo.from_hf("smollm2-135m", quantized=True)
    section = model.config.quantization
    # the file: Q4_1 in every block, the tied table Q8_0 (now the int8 head), norms F32
    assert (section["weights"], section["group_size"], len(section["modules"])) == (
        "int4", 32, 30 * 7 + 1)
    assert section["formats"] == {"lm_head": {"weights": "int8", "group_size": 32}}
    ids = model.tokenizer("def fibonacci(n):\n    ", return_tensors="pt").input_ids
    quantised = model(ids).logits
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            dense = torch.nn.Linear(module.in_features, module.out_features,
                                    bias=module.bias is not None)
            dense.weight.copy_(module.dequantize(torch.float32))
            if module.bias is not None:
                dense.bias.copy_(module.bias)
            replace_module(model, name, dense)
    assert relative_error(model(ids).logits, quantised) <= 1e-5


# --- gguf's quantiser on any zoo model (zoo compress --weights q4_1 | q8_0) -------------------

@pytest.mark.parametrize("format", sorted(GGUF_FORMATS))
def test_quantize_blocks_are_the_bytes_gguf_writes(format):
    weight = torch.from_numpy(_weight(40, 128, seed=1))
    blocks = quantize_blocks(weight, format)
    raw = gguf.quants.quantize(weight.numpy(), _qtype(format))
    assert torch.equal(blocks.dequantize(),
                       torch.from_numpy(gguf.quants.dequantize(raw, _qtype(format))))


@pytest.mark.parametrize("format", ["q8_0", "q4_1"])
def test_quantize_model_gguf_quantises_every_target_as_gguf_does(format):
    torch.manual_seed(0)
    model = zoo.ZooForCausalLM(zoo.load_config("attention-tiny")).eval()
    reference = {name: linear.weight.detach().clone() for name, linear in linear_targets(model)}
    section = quantize_model_gguf(model, format)
    assert section["method"] == "gguf" and "formats" not in section
    assert section["modules"] == list(reference)
    assert model.config.quantization is section and not model.config.tie_word_embeddings
    for name, weight in reference.items():
        layer = model.get_submodule(name)
        assert torch.equal(layer.dequantize(torch.float32),
                           quantize_blocks(weight, format).dequantize()), name


def test_quantize_model_gguf_refuses_a_width_that_is_not_whole_blocks():
    model = zoo.ZooForCausalLM(zoo.load_config(
        "attention-tiny", d_model=48, mixer={"type": "attention", "n_heads": 2}))
    with pytest.raises(CompressionError, match=r"weights='q4_1': stores blocks of 32 inputs; "
                       r"model.layers.0.mixer.q_proj has 48"):
        quantize_model_gguf(model, "q4_1")
    with pytest.raises(CompressionError, match="weights='q5_k': GGUF formats: q8_0, q4_0, q4_1"):
        quantize_model_gguf(model, "q5_k")
def test_a_quantized_import_round_trips_through_save_pretrained(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM

    model = zoo.from_hf(str(tiny_gguf), quantized=True)
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert loaded.config.quantization == model.config.quantization
    assert isinstance(loaded.lm_head, QuantizedLinear) and loaded.lm_head.weights == "int8"
    saved, back = model.state_dict(), loaded.state_dict()
    assert saved.keys() == back.keys()
    for name, tensor in saved.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    ids = torch.tensor([[1, 5, 7, 9, 11, 2, 40]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
