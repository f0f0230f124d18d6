"""Pruning: zero the least important weights of every linear layer of the mixers and FFNs
(`linear_targets`, the output head left dense), unstructured or N:M, scored by magnitude or by
Wanda, or chosen and compensated by SparseGPT. Pruned weights stay dense float tensors holding
zeros: the point here is the quality a pattern costs, and a 2:4 layout a GPU sparse kernel can
take later; a CPU decodes it no faster.

- magnitude: score |W|.
- wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"): score
  |W_ij| * ||X_j||_2, where ||X_j|| is the norm of input channel j over the calibration tokens.
  Layer by layer, as the paper's code does: block i's inputs come from blocks 0..i-1 already
  pruned, and block i's output is recomputed with its pruned weights before block i+1 sees it.
- sparsegpt (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
  Pruned in One-Shot"; compression/sparsegpt.py): the mask by w² / [H⁻¹]_jj, and the error of
  each pruned column fed to the columns after it through the inverse Hessian, so the kept
  weights change too; the same block-by-block calibration as wanda.
- Sparsity "N:M" keeps the N best of every M consecutive inputs of a row (2:4, 4:8); a fraction
  s in (0, 1) prunes the int(s * in) lowest-scored weights of each output row (Wanda's
  comparison group, used for magnitude too, so the two differ only in the score).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

import torch
from torch import nn

from .calibration import NEVER_RAN, InputHessians, check_calibration, run_block_by_block
from .sparsegpt import sparsegpt_prune
from .targets import CompressionError, linear_targets

PRUNING_METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclasses.dataclass(frozen=True)
class Sparsity:
    """Unstructured: `fraction` of each row pruned; N:M: `n` of every `m` inputs kept."""

    fraction: float | None = None
    n: int | None = None
    m: int | None = None

    @property
    def pruned_fraction(self) -> float:
        return self.fraction if self.fraction is not None else 1 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.m is not None else f"{self.fraction:g}"


def parse_sparsity(value: float | str | Sparsity) -> Sparsity:
    """0.5, "0.5", "2:4" -> Sparsity; anything else is a CompressionError naming sparsity."""
    if isinstance(value, Sparsity):
        return value
    text = str(value).strip()
    pattern = re.fullmatch(r"(\d+):(\d+)", text)
    if pattern:
        n, m = int(pattern[1]), int(pattern[2])
        if not 0 < n < m:
            raise CompressionError("sparsity", text, "N:M keeps N of every M inputs, "
                                   "so it needs 0 < N < M (2:4, 4:8)")
        return Sparsity(n=n, m=m)
    try:
        fraction = float(text)
    except ValueError:
        raise CompressionError("sparsity", value, "must be a fraction in (0, 1) such as 0.5, "
                               "or N:M such as 2:4") from None
    if not 0 < fraction < 1:  # NaN fails too
        raise CompressionError("sparsity", value, "a fraction must lie in (0, 1)")
    return Sparsity(fraction=fraction)


def keep_mask(scores: torch.Tensor, sparsity: Sparsity) -> torch.Tensor:
    """bool (out, in): True for the weights kept, from scores (out, in). Exact: every group of M
    inputs of a row keeps N, or every row prunes int(fraction * in) (ties broken by position).
    """
    out_features, in_features = scores.shape
    if sparsity.m is not None:
        if in_features % sparsity.m:
            raise ValueError(f"N:M with M={sparsity.m} needs an input width divisible by it, "
                             f"got {in_features}")
        groups = scores.reshape(out_features, in_features // sparsity.m, sparsity.m)
        kept = groups.topk(sparsity.n, dim=-1).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, kept, True)
        return mask.view(out_features, in_features)
    pruned = int(in_features * sparsity.fraction)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if pruned:
        lowest = scores.topk(pruned, dim=1, largest=False).indices
        mask.scatter_(1, lowest, False)
    return mask


def pruning_scores(weight: torch.Tensor, method: str,
                   input_norms: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of each weight (out, in): |W| (magnitude) or |W| * ||X_j|| (wanda)."""
    score = weight.detach().abs().to(torch.float64)
    if method == "wanda":
        score = score * input_norms.to(device=score.device, dtype=torch.float64)[None, :]
    return score


@dataclasses.dataclass
class PruningResult:
    """Per pruned layer its zero weights and its size; the layers left dense and why (Wanda
    needs a layer's inputs: a layer whose weight is read directly, never called as a module,
    e.g. Mamba's dt_proj, has none)."""

    zeros: dict[str, int]
    sizes: dict[str, int]
    left_dense: dict[str, str]

    @property
    def sparsity(self) -> dict[str, float]:
        """Fraction of zero weights per pruned layer."""
        return {name: self.zeros[name] / self.sizes[name] for name in self.zeros}

    @property
    def overall(self) -> float:
        """Fraction of zero weights over all the pruned layers together."""
        return sum(self.zeros.values()) / max(sum(self.sizes.values()), 1)


@torch.no_grad()
def prune_model(model: nn.Module, method: str = "wanda", sparsity: float | str = 0.5,
                calibration: torch.Tensor | None = None, skip: Iterable[str] = ()
                ) -> PruningResult:
    """Prune `model` in place (module doc). `calibration`: token ids (B, T), needed by wanda
    and sparsegpt (calibration text from the default corpus: zoo compress takes it from the
    training split). Errors name the argument: an unknown method, a sparsity outside (0, 1) or
    N:M with N >= M, N:M whose M does not divide a layer's input, wanda or sparsegpt without
    calibration, a model without linear layers to prune."""
    if method not in PRUNING_METHODS:
        raise CompressionError("method", method, f"allowed: {', '.join(PRUNING_METHODS)}")
    pattern = parse_sparsity(sparsity)
    targets = linear_targets(model, skip, include_head=False)
    if not targets:
        raise CompressionError("method", method, "the model has no linear layer to prune")
    if pattern.m is not None:
        for name, linear in targets:
            if linear.in_features % pattern.m:
                raise CompressionError("sparsity", str(pattern), f"M={pattern.m} does not "
                                       f"divide the input width {linear.in_features} of {name}")
    if method == "magnitude":
        for _, linear in targets:
            linear.weight.mul_(keep_mask(pruning_scores(linear.weight, method), pattern))
        return _result(targets, {})
    check_calibration(calibration, method)
    prune = _prune_wanda if method == "wanda" else _prune_sparsegpt
    left_dense = prune(model, targets, pattern, calibration)
    return _result([(n, m) for n, m in targets if n not in left_dense], left_dense)


def _result(pruned: list[tuple[str, nn.Linear]], left_dense: dict[str, str]) -> PruningResult:
    return PruningResult({name: int((m.weight == 0).sum()) for name, m in pruned},
                         {name: m.weight.numel() for name, m in pruned}, left_dense)


def _prune_wanda(model: nn.Module, targets: list[tuple[str, nn.Linear]], pattern: Sparsity,
                 calibration: torch.Tensor) -> dict[str, str]:
    """One pass block by block (compression.calibration): each linear layer sums its inputs'
    squares per channel; when a block has run, its layers are pruned by |W| * ||X_j||. Returns
    the layers left dense."""
    squares: dict[str, torch.Tensor] = {}
    left_dense: dict[str, str] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        total = x.to(torch.float64).square().sum(dim=0)
        squares[name] = squares[name] + total if name in squares else total

    def prune_block(index: int, layers: list[tuple[str, nn.Linear]]) -> None:
        for name, linear in layers:
            if name not in squares:
                left_dense[name] = NEVER_RAN
                continue
            scores = pruning_scores(linear.weight, "wanda", squares.pop(name).sqrt())
            linear.weight.mul_(keep_mask(scores, pattern))

    run_block_by_block(model, targets, calibration, observe, prune_block, "wanda")
    return left_dense


def _prune_sparsegpt(model: nn.Module, targets: list[tuple[str, nn.Linear]], pattern: Sparsity,
                     calibration: torch.Tensor) -> dict[str, str]:
    """One pass block by block (compression.calibration): each linear layer sums its inputs'
    Hessian; when a block has run, SparseGPT prunes its layers (and updates their kept
    weights). Returns the layers left dense."""
    hessians = InputHessians()
    left_dense: dict[str, str] = {}

    def prune_block(index: int, layers: list[tuple[str, nn.Linear]]) -> None:
        for name, linear in layers:
            hessian = hessians.pop(name)
            if hessian is None:
                left_dense[name] = NEVER_RAN
                continue
            linear.weight.copy_(sparsegpt_prune(linear.weight, hessian, pattern))

    run_block_by_block(model, targets, calibration, hessians.add, prune_block, "sparsegpt")
    return left_dense
