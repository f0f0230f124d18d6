"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot"): one-shot pruning of a linear layer by optimal brain surgery on the Hessian
H = 2 XᵀX / n of its calibration inputs, the machinery GPTQ (compression/gptq.py) shares.

Columns are visited left to right in blocks of 128. Pruning column j costs w²/[H_F⁻¹]_jj in the
layer's output error, F the columns from j on (those before are fixed by then);
[H_F⁻¹]_jj = U_jj², U the upper Cholesky factor of H⁻¹ (`inverse_hessian_factor`). Each pruned
weight's error is fed to the columns after it through row j of U (the OBS update), so the
weights kept change to make up for the ones removed. The mask, like the reference code's:
- N:M: at the first column of every group of M, the M - N lowest w²/U_jj² of each row's group,
  on the weights as updated so far;
- a fraction s: at each block's start, the lowest w²/U_jj² of each row within the block, as many
  as bring the row to int(s * end) pruned weights by the block's end (so each row ends with
  exactly int(s * in), the comparison group Wanda and magnitude use here; the reference picks a
  threshold over the whole block instead, which leaves rows uneven).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .calibration import DAMPENING, inverse_hessian_factor

if TYPE_CHECKING:
    from .prune import Sparsity

SPARSEGPT_BLOCK_SIZE = 128


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: Sparsity, *,
                    block_size: int = SPARSEGPT_BLOCK_SIZE, dampening: float = DAMPENING
                    ) -> torch.Tensor:
    """`weight` (out, in) pruned to exactly `sparsity`, its kept weights updated (module doc),
    in its own dtype; computed in float64. `hessian`: H (in, in) of the layer's inputs."""
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}; a weight of input width "
                         f"{in_features} needs ({in_features}, {in_features})")
    group = sparsity.m
    if group is not None:
        if in_features % group:
            raise ValueError(f"N:M with M={group} needs an input width divisible by it, "
                             f"got {in_features}")
        block_size -= block_size % group  # a group of M never straddles two blocks
    factor = inverse_hessian_factor(hessian, dampening)
    w = weight.detach().to(torch.float64).clone()
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        block = w[:, start:end].clone()
        block_factor = factor[start:end, start:end]
        # the OBS saliency's denominator, column by column of the block
        inverse_diagonal = block_factor.diagonal().square()
        pruned = torch.zeros_like(block, dtype=torch.bool)
        if group is None:
            count = int(end * sparsity.fraction) - int(start * sparsity.fraction)
            if count:
                saliency = block.square() / inverse_diagonal
                pruned.scatter_(1, saliency.topk(count, dim=1, largest=False).indices, True)
        errors = torch.zeros_like(block)
        for i in range(end - start):
            if group is not None and i % group == 0:
                saliency = block[:, i:i + group].square() / inverse_diagonal[i:i + group]
                lowest = saliency.topk(group - sparsity.n, dim=1, largest=False).indices
                pruned[:, i:i + group].scatter_(1, lowest, True)
            column = block[:, i]
            kept = torch.where(pruned[:, i], torch.zeros_like(column), column)
            error = (column - kept) / block_factor[i, i]
            block[:, i + 1:] -= error[:, None] * block_factor[i, i + 1:][None, :]
            block[:, i] = kept
            errors[:, i] = error
        w[:, start:end] = block
        w[:, end:] -= errors @ factor[start:end, end:]
    return w.to(weight.dtype)
