"""GPTQ: on a layer with correlated inputs its output error is well below round to nearest's, it
equals a plain float64 restatement of the algorithm (the OBS update with the inverse Hessian
shrunk one column at a time), it writes round to nearest's layout (and is round to nearest when
the inputs are uncorrelated), keeps pruned zeros, and on a model runs block by block on the
quantised blocks' outputs, into a folder that loads back bit-exactly."""

import pytest
import safetensors.torch
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import zoo
from zoo.compression import (
    CompressionError,
    QuantizedLinear,
    check_quantization_section,
    gptq_quantize,
    linear_targets,
    quantize_int4,
    quantize_int8,
    quantize_model,
    quantized_layers,
)
from zoo.compression.gptq import quantized_linear_from_codes
from zoo.compression.targets import replace_module
from zoo.testing import (
    assert_close,
    correlated_inputs,
    linear_input_hessians,
    random_tokens,
    seeded_model,
)

FORMATS = [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)]


def _linear(out_features: int, in_features: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=False).double().requires_grad_(False)
    nn.init.normal_(linear.weight)
    return linear


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.T @ x / x.shape[0]


def _grid(current: torch.Tensor, weights: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of a group of columns: round to nearest's, by definition of the
    layout GPTQ writes."""
    if weights == "int8":
        _, scale = quantize_int8(current)
        return scale[:, 0], torch.zeros_like(scale[:, 0])
    _, scale, zero = quantize_int4(current, current.shape[1])
    return scale[:, 0], zero[:, 0]


def _reference_gptq(weight: torch.Tensor, hessian: torch.Tensor, weights: str,
                    group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ as the paper states it, in float64, with no Cholesky and no blocks: quantise
    column j, spread (w_j - q_j) / [H⁻¹]_jj over the later columns along row j of H⁻¹, then
    remove j from H⁻¹ (Gaussian elimination). A group's grid comes from its current weights at
    its first column. Returns (codes, dequantised weight)."""
    w = weight.clone().double()
    out_features, width = w.shape
    h = hessian.clone().double()
    h.diagonal()[h.diagonal() == 0] = 1
    h += 0.01 * h.diagonal().mean() * torch.eye(width, dtype=torch.float64)
    inverse = torch.linalg.inv(h)
    group = width if group_size is None else group_size
    low, high = (-127, 127) if weights == "int8" else (0, 15)
    codes = torch.zeros(out_features, width, dtype=torch.int64)
    result = torch.zeros_like(w)
    for j in range(width):
        if j % group == 0:
            scale, zero = _grid(w[:, j:j + group], weights)
        code = torch.round((w[:, j] - zero) / scale).clamp(low, high)
        codes[:, j], result[:, j] = code.long(), code * scale + zero
        error = (w[:, j] - result[:, j]) / inverse[j, j]
        w[:, j:] -= error[:, None] * inverse[j, j:][None, :]
        inverse -= inverse[:, j:j + 1] @ inverse[j:j + 1, :] / inverse[j, j]
    return codes, result


def _dequantized(linear: nn.Linear, weights: str, group_size: int | None,
                 quantized: tuple) -> torch.Tensor:
    return quantized_linear_from_codes(linear, weights, group_size, *quantized).dequantize()


@pytest.mark.parametrize(("weights", "group_size"), FORMATS)
@pytest.mark.parametrize("block_size", [128, 32])
def test_gptq_equals_a_float64_restatement_of_the_algorithm(weights, group_size, block_size):
    """In 256 wide: two blocks of 128 (or eight of 32, whose groups of 64 and 128 start at a
    block's start)."""
    linear = _linear(12, 256, seed=3)
    hessian = _hessian(correlated_inputs(512, 256, seed=3))
    quantized = gptq_quantize(linear.weight, hessian, weights, group_size,
                              block_size=block_size)
    codes, expected = _reference_gptq(linear.weight, hessian, weights, group_size)
    assert torch.equal(quantized[0].long(), codes)
    assert_close("dequantised", expected, _dequantized(linear, weights, group_size, quantized),
                 1e-6)


@pytest.mark.parametrize(("weights", "group_size"), FORMATS)
def test_gptq_output_error_is_well_below_round_to_nearest(weights, group_size):
    ratios = []
    for seed in range(4):
        x = correlated_inputs(1024, 256, seed)
        linear = _linear(64, 256, seed)
        gptq = _dequantized(linear, weights, group_size, gptq_quantize(
            linear.weight, _hessian(x), weights, group_size))
        nearest = QuantizedLinear.from_linear(linear, weights, group_size).dequantize()
        ratio = (x @ (linear.weight - gptq).T).norm() / (x @ (linear.weight - nearest).T).norm()
        ratios.append(float(ratio))
    assert max(ratios) < 0.85 and sum(ratios) / len(ratios) < 0.8, ratios


@pytest.mark.parametrize(("weights", "group_size"), FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uncorrelated_inputs_give_round_to_nearest_exactly(weights, group_size, dtype):
    """A diagonal H couples no two columns: no error is spread, and the codes, scales and
    zeros are round to nearest's, the layout every other path reads."""
    linear = _linear(32, 256, seed=5).to(dtype)
    hessian = torch.diag(torch.rand(256, dtype=torch.float64) + 0.1)
    gptq = quantized_linear_from_codes(linear, weights, group_size, *gptq_quantize(
        linear.weight, hessian, weights, group_size))
    nearest = QuantizedLinear.from_linear(linear, weights, group_size)
    for name, tensor in nearest.state_dict().items():
        assert torch.equal(gptq.state_dict()[name], tensor), name


@pytest.mark.parametrize(("weights", "group_size"), [("int8", None), ("int4", 32)])
def test_codes_stay_in_range_and_pruned_zeros_stay_zero(weights, group_size):
    linear = _linear(16, 128, seed=7)
    with torch.no_grad():
        linear.weight.view(16, -1, 4)[..., :2] = 0  # a 2:4 pattern
        linear.weight.mul_(40)  # outliers that error feedback pushes past the grid's ends
    codes, scale, zero = gptq_quantize(linear.weight, _hessian(correlated_inputs(256, 128, 7)),
                                       weights, group_size)
    low, high = (-127, 127) if weights == "int8" else (0, 15)
    assert codes.min() >= low and codes.max() <= high
    weight = _dequantized(linear, weights, group_size, (codes, scale, zero))
    assert (weight[linear.weight == 0] == 0).all()


def test_bad_arguments_name_what_is_wrong():
    linear = _linear(8, 64, seed=0)
    hessian = torch.eye(64, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"group_size=48 does not divide the input width 64"):
        gptq_quantize(linear.weight, hessian, "int4", 48)
    with pytest.raises(ValueError, match=r"hessian has shape \(32, 32\); a weight of input "
                       r"width 64 needs \(64, 64\)"):
        gptq_quantize(linear.weight, torch.eye(32), "int8", None)
    with pytest.raises(ValueError, match=r"group_size=64 straddles blocks of 48 columns"):
        gptq_quantize(_linear(8, 128, 0).weight, torch.eye(128), "int4", 64, block_size=48)


@torch.no_grad()
def _gptq_one_block_at_a_time(model: zoo.ZooForCausalLM, calibration: torch.Tensor) -> None:
    """The reference: for each block in turn, run the model (earlier blocks quantised already)
    to collect this block's Hessians, then quantise this block; the head last, on the output
    of the whole quantised backbone."""
    targets = linear_targets(model)

    def quantize(name: str, linear: nn.Linear, hessian: torch.Tensor) -> None:
        replace_module(model, name, quantized_linear_from_codes(
            linear, "int4", 32, *gptq_quantize(linear.weight, hessian, "int4", 32)))

    for index in range(len(model.model.layers)):
        mine = [(n, m) for n, m in targets if n.startswith(f"model.layers.{index}.")]
        hessians = linear_input_hessians(model, mine, calibration)
        for name, linear in mine:
            quantize(name, linear, hessians.pop(name))
    hidden = model.model(calibration)[0]
    quantize("lm_head", model.lm_head, _hessian(hidden.reshape(-1, hidden.shape[-1]).double()))


@pytest.mark.parametrize("name", ["attention-tiny", "rwkv7-tiny"])
def test_gptq_quantises_each_block_on_the_quantised_blocks_outputs(name):
    """rwkv7: later layers read layer 0's values (the forward context)."""
    calibration = random_tokens()
    model, reference = seeded_model(name), seeded_model(name)
    section = quantize_model(model, "int4", 32, method="gptq", calibration=calibration)
    _gptq_one_block_at_a_time(reference, calibration)
    assert section["method"] == "gptq" and "rounded_to_nearest" not in section
    layers = quantized_layers(model)
    assert [n for n, _ in layers] == section["modules"]
    for layer_name, layer in layers:
        expected = reference.get_submodule(layer_name)
        for tensor_name, tensor in expected.state_dict().items():
            assert torch.equal(layer.state_dict()[tensor_name], tensor), (layer_name,
                                                                            tensor_name)


def test_gptq_model_logits_are_closer_to_float_than_round_to_nearest():
    calibration = random_tokens()
    float_model, gptq, nearest = seeded_model(), seeded_model(), seeded_model()
    quantize_model(gptq, "int4", 32, method="gptq", calibration=calibration)
    quantize_model(nearest, "int4", 32)
    with torch.no_grad():
        reference = float_model(calibration).logits
        gptq_error = (gptq(calibration).logits - reference).norm()
        nearest_error = (nearest(calibration).logits - reference).norm()
    assert gptq_error < 0.8 * nearest_error


def test_gptq_folder_loads_back_bit_exact(tmp_path):
    model = seeded_model()
    quantize_model(model, "int8", method="gptq", calibration=random_tokens())
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.quantization["method"] == "gptq"
    saved = safetensors.torch.load_file(tmp_path / "model.safetensors")
    for name, tensor in loaded.state_dict().items():
        if name in saved:
            assert torch.equal(tensor, saved[name]), name
    assert saved["model.layers.0.mixer.q_proj.qweight"].dtype == torch.int8
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_layers_gptq_cannot_calibrate_are_rounded_to_nearest_and_named():
    """Mamba reads dt_proj's weight directly: GPTQ sees no inputs for it."""
    model, nearest = seeded_model("mamba-tiny"), seeded_model("mamba-tiny")
    section = quantize_model(model, "int8", method="gptq", calibration=random_tokens())
    quantize_model(nearest, "int8")
    names = [f"model.layers.{i}.mixer.dt_proj" for i in range(len(model.model.layers))]
    assert section["rounded_to_nearest"] == names
    for name in names:
        assert torch.equal(model.get_submodule(name).qweight, nearest.get_submodule(name).qweight)
    check_quantization_section(section)
    with pytest.raises(ValueError, match=r"quantization\.rounded_to_nearest must be a list of "
                       r"names from quantization\.modules, got \['nope'\]"):
        check_quantization_section({**section, "rounded_to_nearest": ["nope"]})


def test_quantize_model_errors_name_the_argument():
    with pytest.raises(CompressionError, match=r"calibration=None: gptq needs calibration token "
                       r"ids \(B, T\)"):
        quantize_model(seeded_model(), "int4", 32, method="gptq")
    with pytest.raises(CompressionError, match=r"calibration=\(48,\): gptq needs calibration"):
        quantize_model(seeded_model(), "int4", 32, method="gptq",
                       calibration=torch.zeros(48).long())
    with pytest.raises(CompressionError, match=r"method='awq': allowed: rtn, gptq"):
        quantize_model(seeded_model(), "int4", 32, method="awq")
    model = seeded_model()
    with pytest.raises(CompressionError, match=r"group_size=128: does not divide the input width "
                       r"64 of model\.layers\.0\.mixer\.q_proj"):
        quantize_model(model, "int4", 128, method="gptq", calibration=random_tokens())
    assert not quantized_layers(model)  # checked before anything was replaced
