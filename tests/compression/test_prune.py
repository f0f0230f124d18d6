"""Pruning: exactly the requested pattern, the lowest scores go, Wanda's score is magnitude
weighted by the input channels' norms (so the two differ where the activations are uneven), and
Wanda prunes block by block on the already pruned blocks' outputs."""

import math

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
)
from zoo.compression.prune import pruning_scores


def _model(name: str = "attention-tiny", seed: int = 0) -> zoo.ZooForCausalLM:
    torch.manual_seed(seed)
    return zoo.ZooForCausalLM(zoo.load_config(name)).eval()


def _calibration(batch: int = 4, length: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("text", "expected"), [
    ("2:4", Sparsity(n=2, m=4)), ("4:8", Sparsity(n=4, m=8)), ("1:3", Sparsity(n=1, m=3)),
    ("0.5", Sparsity(fraction=0.5)), (0.3, Sparsity(fraction=0.3)),
])
def test_sparsity_parses_fractions_and_n_of_m(text, expected):
    assert parse_sparsity(text) == expected


@pytest.mark.parametrize(("value", "message"), [
    ("4:4", r"sparsity='4:4': N:M keeps N of every M inputs, so it needs 0 < N < M"),
    ("5:4", r"0 < N < M"), ("0:4", r"0 < N < M"),
    (1.5, r"sparsity=1\.5: a fraction must lie in \(0, 1\)"), ("0", r"in \(0, 1\)"),
    ("1", r"in \(0, 1\)"), ("nan", r"in \(0, 1\)"),
    ("half", r"sparsity='half': must be a fraction in \(0, 1\) such as 0\.5, or N:M"),
])
def test_bad_sparsities_are_errors_naming_it(value, message):
    with pytest.raises(CompressionError, match=message):
        parse_sparsity(value)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4)])
def test_n_of_m_keeps_exactly_the_n_best_of_every_m(n, m):
    scores = torch.rand(24, 64, dtype=torch.float64)
    mask = keep_mask(scores, Sparsity(n=n, m=m))
    groups, kept = scores.view(24, -1, m), mask.view(24, -1, m)
    assert (kept.sum(-1) == n).all()
    # every kept score beats every pruned one of its group
    lowest_kept = groups.masked_fill(~kept, math.inf).amin(-1)
    highest_pruned = groups.masked_fill(kept, -math.inf).amax(-1)
    assert (lowest_kept > highest_pruned).all()


@pytest.mark.parametrize("fraction", [0.5, 0.3, 0.9])
def test_unstructured_prunes_the_lowest_scores_of_each_row(fraction):
    scores = torch.rand(24, 70, dtype=torch.float64)
    mask = keep_mask(scores, Sparsity(fraction=fraction))
    assert ((~mask).sum(1) == int(70 * fraction)).all()
    lowest_kept = scores.masked_fill(~mask, math.inf).amin(1)
    highest_pruned = scores.masked_fill(mask, -math.inf).amax(1)
    assert (lowest_kept > highest_pruned).all()


def test_wanda_equals_magnitude_on_even_norms_and_differs_on_uneven_ones():
    weight = torch.randn(16, 32)
    magnitude = keep_mask(pruning_scores(weight, "magnitude"), Sparsity(n=2, m=4))
    even = keep_mask(pruning_scores(weight, "wanda", torch.full((32,), 3.0)), Sparsity(n=2, m=4))
    assert torch.equal(magnitude, even)
    uneven_norms = torch.ones(32)
    uneven_norms[3::4] = 1e4  # the last channel of every group carries the activations
    uneven = keep_mask(pruning_scores(weight, "wanda", uneven_norms), Sparsity(n=2, m=4))
    assert not torch.equal(magnitude, uneven)
    assert uneven[:, 3::4].all()


def _pattern_holds(weight: torch.Tensor, sparsity: Sparsity) -> bool:
    rows, width = weight.shape
    nonzero = weight != 0
    if sparsity.m is not None:
        return bool((nonzero.view(rows, -1, sparsity.m).sum(-1) == sparsity.n).all())
    return bool((nonzero.sum(1) == width - int(width * sparsity.fraction)).all())


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("sparsity", ["2:4", "4:8", "0.5"])
def test_every_pruned_layer_has_exactly_the_pattern_and_the_head_stays_dense(method, sparsity):
    model = _model()
    untouched = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = prune_model(model, method, sparsity, _calibration())
    pattern = parse_sparsity(sparsity)
    targets = dict(linear_targets(model, include_head=False))
    assert set(result.sparsity) == set(targets) and not result.left_dense
    for name, linear in targets.items():
        assert _pattern_holds(linear.weight, pattern), name
    assert result.overall == pytest.approx(pattern.pruned_fraction, abs=0.01)
    for name, tensor in model.named_parameters():
        if not any(name.startswith(f"{target}.weight") for target in targets):
            assert torch.equal(tensor, untouched[name]), f"{name} changed"


def test_wanda_differs_from_magnitude_on_a_models_uneven_activations():
    calibration = _calibration()
    by_wanda, by_magnitude = _model(), _model()
    prune_model(by_wanda, "wanda", "2:4", calibration)
    prune_model(by_magnitude, "magnitude", "2:4")
    differing = [name for name, linear in linear_targets(by_wanda, include_head=False)
                 if not torch.equal(linear.weight != 0,
                                    by_magnitude.get_submodule(name).weight != 0)]
    assert len(differing) == len(linear_targets(by_wanda, include_head=False))


def _input_square_sums(model: zoo.ZooForCausalLM, linears: list[tuple[str, nn.Linear]],
                       calibration: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per layer, the sum over the calibration tokens of its inputs' squares, per channel."""
    squares: dict[str, torch.Tensor] = {}

    def hook(name):
        def collect(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            squares[name] = squares.get(name, 0) + x.square().sum(0)
        return collect

    handles = [linear.register_forward_pre_hook(hook(name)) for name, linear in linears]
    with torch.no_grad():
        model(calibration)
    for handle in handles:
        handle.remove()
    return squares


@torch.no_grad()
def _prune_by_norms(linears: list[tuple[str, nn.Linear]], squares: dict[str, torch.Tensor],
                    sparsity: Sparsity) -> None:
    for name, linear in linears:
        scores = linear.weight.abs().double() * squares[name].sqrt()[None]
        linear.weight.mul_(keep_mask(scores, sparsity))


def _wanda_one_block_at_a_time(model: zoo.ZooForCausalLM, sparsity: Sparsity,
                               calibration: torch.Tensor) -> None:
    """The reference: for each block in turn, run the model (earlier blocks already pruned) to
    collect the norms of this block's inputs, then prune this block."""
    targets = linear_targets(model, include_head=False)
    for index in range(len(model.model.layers)):
        mine = [(n, m) for n, m in targets if n.startswith(f"model.layers.{index}.")]
        _prune_by_norms(mine, _input_square_sums(model, mine, calibration), sparsity)


@pytest.mark.parametrize("name", ["attention-tiny", "rwkv7-tiny", "moe-tiny"])
def test_wanda_prunes_each_block_on_the_pruned_blocks_outputs(name):
    """rwkv7: later layers read layer 0's values (the forward context); moe: shared experts."""
    calibration = _calibration()
    model, reference = _model(name), _model(name)
    prune_model(model, "wanda", "0.5", calibration)
    _wanda_one_block_at_a_time(reference, Sparsity(fraction=0.5), calibration)
    for (name_a, a), (_, b) in zip(linear_targets(model, include_head=False),
                                   linear_targets(reference, include_head=False)):
        assert torch.equal(a.weight, b.weight), name_a
    # block 1 saw block 0's pruned output: pruning on the dense model's inputs differs
    dense_inputs = _model(name)
    _wanda_on_dense_inputs(dense_inputs, calibration)
    later = [n for n, _ in linear_targets(model, include_head=False)
             if not n.startswith("model.layers.0.")]
    assert any(not torch.equal(model.get_submodule(n).weight, dense_inputs.get_submodule(n).weight)
               for n in later)


def _wanda_on_dense_inputs(model: zoo.ZooForCausalLM, calibration: torch.Tensor) -> None:
    """Every layer scored on the dense model's inputs at once (not what Wanda does)."""
    targets = linear_targets(model, include_head=False)
    _prune_by_norms(targets, _input_square_sums(model, targets, calibration),
                    Sparsity(fraction=0.5))


def test_a_layer_whose_forward_never_runs_is_left_dense_and_named():
    """Mamba reads dt_proj's weight directly: Wanda has no inputs to score it by."""
    model = _model("mamba-tiny")
    dt_weights = [m.dt_proj.weight.detach().clone() for m in
                  (b.mixer for b in model.model.layers)]
    result = prune_model(model, "wanda", "2:4", _calibration())
    assert set(result.left_dense) == {f"model.layers.{i}.mixer.dt_proj"
                                      for i in range(len(dt_weights))}
    for block, before in zip(model.model.layers, dt_weights):
        assert torch.equal(block.mixer.dt_proj.weight, before)
        assert _pattern_holds(block.mixer.in_proj.weight, Sparsity(n=2, m=4))


def test_pruning_errors_name_the_argument():
    with pytest.raises(CompressionError,
                       match=r"method='obs': allowed: magnitude, wanda, sparsegpt"):
        prune_model(_model(), "obs", 0.5)
    with pytest.raises(CompressionError, match=r"sparsity='1:3': M=3 does not divide the input "
                       r"width 64 of model\.layers\.0\.mixer\.q_proj"):
        prune_model(_model(), "magnitude", "1:3")
    with pytest.raises(CompressionError, match=r"calibration=None: wanda needs calibration"):
        prune_model(_model(), "wanda", 0.5)
    with pytest.raises(CompressionError, match=r"no linear layer to prune"):
        prune_model(_model(), "magnitude", 0.5, skip=["*"])


def test_wanda_restores_training_mode_and_leaves_a_usable_float_model():
    model = _model().train()
    prune_model(model, "wanda", "2:4", _calibration())
    assert model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.isfinite(model(torch.randint(0, 256, (1, 10))).logits).all()
