"""SparseGPT: exactly the requested N:M or per-row pattern, an output error below Wanda's and
magnitude's on a layer with correlated inputs, the same result as a plain float64 restatement
of the OBS pruning step, and on a model block by block on the pruned blocks' outputs."""

import pytest
import torch
from torch import nn

import zoo
from zoo.compression import (
    CompressionError,
    Sparsity,
    keep_mask,
    linear_targets,
    parse_sparsity,
    prune_model,
    quantize_model,
    sparsegpt_prune,
)
from zoo.compression.prune import pruning_scores
from zoo.testing import (
    assert_close,
    correlated_inputs,
    linear_input_hessians,
    random_tokens,
    seeded_model,
)


def _weight(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    return torch.randn(out_features, in_features, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(seed + 100))


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.T @ x / x.shape[0]


def _pattern_holds(weight: torch.Tensor, sparsity: Sparsity) -> bool:
    rows, width = weight.shape
    nonzero = weight != 0
    if sparsity.m is not None:
        return bool((nonzero.view(rows, -1, sparsity.m).sum(-1) == sparsity.n).all())
    return bool((nonzero.sum(1) == width - int(width * sparsity.fraction)).all())


@pytest.mark.parametrize("sparsity", ["2:4", "4:8", "1:3", "0.5", "0.3", "0.9"])
@pytest.mark.parametrize("width", [96, 384])
def test_sparsegpt_hits_the_exact_pattern(sparsity, width):
    """384: three blocks of 128 (126 for M=3); 0.3 of 128 is no whole number per block."""
    pattern = parse_sparsity(sparsity)
    pruned = sparsegpt_prune(_weight(24, width, 0), _hessian(correlated_inputs(256, width, 0)),
                             pattern)
    assert _pattern_holds(pruned, pattern)


def _output_error(x: torch.Tensor, weight: torch.Tensor, pruned: torch.Tensor) -> float:
    return float((x @ (weight - pruned).T).norm())


@pytest.mark.parametrize("sparsity", ["2:4", "4:8", "0.5"])
def test_sparsegpt_output_error_is_below_wanda_and_magnitude(sparsity):
    pattern = parse_sparsity(sparsity)
    versus_wanda, versus_magnitude = [], []
    for seed in range(4):
        x, weight = correlated_inputs(1024, 256, seed), _weight(64, 256, seed)

        sparsegpt = _output_error(x, weight, sparsegpt_prune(weight, _hessian(x), pattern))
        wanda = _output_error(x, weight, weight * keep_mask(pruning_scores(
            weight, "wanda", x.square().sum(0).sqrt()), pattern))
        magnitude = _output_error(x, weight, weight * keep_mask(
            pruning_scores(weight, "magnitude"), pattern))
        versus_wanda.append(sparsegpt / wanda)
        versus_magnitude.append(sparsegpt / magnitude)
    assert max(versus_wanda) < 0.9, versus_wanda
    assert max(versus_magnitude) < 0.75, versus_magnitude


def _reference_sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, n: int, m: int
                         ) -> torch.Tensor:
    """N:M SparseGPT as OBS states it, in float64, no Cholesky: at each group's first column
    prune the M - N lowest w_k² / d_k of each row's group, d_k = [(H_{k:, k:})⁻¹]_00 the
    inverse Hessian's entry for column k once the columns before k are fixed (what the
    reference code's Cholesky diagonal holds); then column by column spread
    (w_j - kept_j) / [H⁻¹]_jj over the later columns along row j of H⁻¹, and remove j from
    H⁻¹ (Gaussian elimination)."""
    w = weight.clone()
    width = w.shape[1]
    h = hessian.clone()
    h += 0.01 * h.diagonal().mean() * torch.eye(width, dtype=torch.float64)
    inverse = torch.linalg.inv(h)
    own = torch.stack([torch.linalg.inv(h[k:, k:])[0, 0] for k in range(width)])
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for j in range(width):
        if j % m == 0:
            saliency = w[:, j:j + m].square() / own[j:j + m]
            lowest = saliency.topk(m - n, dim=1, largest=False).indices
            pruned[:, j:j + m].scatter_(1, lowest, True)
        kept = torch.where(pruned[:, j], 0.0, w[:, j])
        error = (w[:, j] - kept) / inverse[j, j]
        w[:, j:] -= error[:, None] * inverse[j, j:][None, :]
        w[:, j] = kept
        inverse -= inverse[:, j:j + 1] @ inverse[j:j + 1, :] / inverse[j, j]
    return w


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8)])
def test_sparsegpt_equals_a_float64_restatement_of_obs_pruning(n, m):
    weight, hessian = _weight(12, 256, 3), _hessian(correlated_inputs(512, 256, 3))
    expected = _reference_sparsegpt(weight, hessian, n, m)
    for block_size in (128, 32):
        pruned = sparsegpt_prune(weight, hessian, Sparsity(n=n, m=m), block_size=block_size)
        assert torch.equal(pruned == 0, expected == 0)
        assert_close(f"block {block_size}", expected, pruned, 1e-6)


def test_sparsegpt_keeps_the_dtype_and_names_a_wrong_hessian():
    weight = _weight(8, 64, 0).float()
    assert sparsegpt_prune(weight, torch.eye(64), Sparsity(n=2, m=4)).dtype == torch.float32
    with pytest.raises(ValueError, match=r"hessian has shape \(32, 32\); a weight of input "
                       r"width 64 needs \(64, 64\)"):
        sparsegpt_prune(weight, torch.eye(32), Sparsity(fraction=0.5))


@torch.no_grad()
def _sparsegpt_one_block_at_a_time(model: zoo.ZooForCausalLM, sparsity: Sparsity,
                                   calibration: torch.Tensor) -> None:
    """The reference: for each block in turn, run the model (earlier blocks pruned already) to
    collect this block's Hessians, then prune this block."""
    targets = linear_targets(model, include_head=False)
    for index in range(len(model.model.layers)):
        mine = [(n, m) for n, m in targets if n.startswith(f"model.layers.{index}.")]
        hessians = linear_input_hessians(model, mine, calibration)
        for name, linear in mine:
            linear.weight.copy_(sparsegpt_prune(linear.weight, hessians.pop(name), sparsity))


@pytest.mark.parametrize("name", ["attention-tiny", "moe-tiny"])
def test_sparsegpt_prunes_each_block_on_the_pruned_blocks_outputs(name):
    calibration = random_tokens()
    model, reference = seeded_model(name), seeded_model(name)
    untouched = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = prune_model(model, "sparsegpt", "2:4", calibration)
    _sparsegpt_one_block_at_a_time(reference, Sparsity(n=2, m=4), calibration)
    targets = dict(linear_targets(model, include_head=False))
    assert set(result.sparsity) == set(targets) and not result.left_dense
    assert result.overall == 0.5
    for layer_name, linear in targets.items():
        assert _pattern_holds(linear.weight, Sparsity(n=2, m=4)), layer_name
        assert torch.equal(linear.weight, reference.get_submodule(layer_name).weight), layer_name
    for tensor_name, tensor in model.named_parameters():
        if not any(tensor_name == f"{target}.weight" for target in targets):
            assert torch.equal(tensor, untouched[tensor_name]), f"{tensor_name} changed"


def test_sparsegpt_model_logits_are_closer_to_dense_than_wanda():
    calibration = random_tokens()
    dense, sparsegpt, wanda = seeded_model(), seeded_model(), seeded_model()
    prune_model(sparsegpt, "sparsegpt", "2:4", calibration)
    prune_model(wanda, "wanda", "2:4", calibration)
    with torch.no_grad():
        reference = dense(calibration).logits
        sparsegpt_error = (sparsegpt(calibration).logits - reference).norm()
        wanda_error = (wanda(calibration).logits - reference).norm()
    assert sparsegpt_error < 0.9 * wanda_error


def test_layers_never_called_are_left_dense_and_named():
    """Mamba reads dt_proj's weight directly: SparseGPT has no inputs for it."""
    model = seeded_model("mamba-tiny")
    result = prune_model(model, "sparsegpt", "0.5", random_tokens())
    assert set(result.left_dense) == {f"model.layers.{i}.mixer.dt_proj"
                                      for i in range(len(model.model.layers))}


def test_sparsegpt_then_gptq_keeps_the_pattern():
    calibration = random_tokens()
    model = seeded_model()
    prune_model(model, "sparsegpt", "2:4", calibration)
    quantize_model(model, "int4", 32, method="gptq", calibration=calibration)
    for name, _ in linear_targets(seeded_model(), include_head=False):
        weight = model.get_submodule(name).dequantize()
        assert ((weight.view(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all(), name


def test_sparsegpt_without_calibration_names_it():
    with pytest.raises(CompressionError, match=r"calibration=None: sparsegpt needs calibration "
                       r"token ids \(B, T\)"):
        prune_model(seeded_model(), "sparsegpt", "2:4")
    with pytest.raises(CompressionError, match=r"method='obs': allowed: magnitude, wanda, "
                       r"sparsegpt"):
        prune_model(seeded_model(), "obs", "2:4")


def test_sparsegpt_on_a_linear_layer_alone():
    """A model-free call: the same function the model path runs, on an nn.Linear's weight."""
    linear = nn.Linear(64, 16, bias=False)
    x = torch.randn(200, 64)
    pruned = sparsegpt_prune(linear.weight, _hessian(x.double()), Sparsity(fraction=0.25))
    assert _pattern_holds(pruned, Sparsity(fraction=0.25)) and pruned.dtype == torch.float32
