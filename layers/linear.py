"""`Linear`: `nn.Linear` whose products with a few rows (decoding) use every CPU core.

On the CPU, MKL runs a float32 matrix-vector product (and skinny products of up to ~16 rows)
on one thread, which reads the weight at a fraction of the memory's bandwidth; viewing the
weight's rows as a batch of blocks turns the product into a batched GEMM, which MKL spreads
over the cores
(what that gained on SmolLM2's output head: README, "Measured: decoding"). Parameters,
state-dict names and results (up to summation order) are those of `nn.Linear`; training-sized
inputs take `F.linear`, and so do bfloat16 and float16 weights, whose oneDNN products are faster
than the batched one at every row count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Below these, the plain product is as fast (small weights stay in cache; many rows make a GEMM).
MIN_BLOCKED_WEIGHT = 2**16
MAX_BLOCKED_ROWS = 16


def blocked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   blocks: int) -> torch.Tensor:
    """F.linear(x, weight, bias) as one batched product over `blocks` slices of weight's rows.

    x (..., in) with few rows; weight (out, in) contiguous, out divisible by blocks."""
    out_features, in_features = weight.shape
    rows = x.reshape(-1, in_features)
    y = torch.bmm(
        weight.view(blocks, out_features // blocks, in_features),
        rows.t().expand(blocks, in_features, rows.shape[0]),
    )  # (blocks, out / blocks, rows)
    y = y.permute(2, 0, 1).reshape(*x.shape[:-1], out_features)
    return y if bias is None else y + bias


def row_blocks(out_features: int) -> int:
    """How many blocks to split the weight's rows into: 16 (the batched product hands blocks to
    however many threads there are, so more blocks than cores costs nothing), or fewer when 16
    does not divide out_features; 1 means "do not split"."""
    for blocks in (16, 8, 4, 2):
        if out_features % blocks == 0:
            return blocks
    return 1


class Linear(nn.Linear):
    """nn.Linear with the few-row CPU product of `blocked_linear`; x (..., in) -> (..., out)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = row_blocks(self.out_features)
        if (
            x.device.type == "cpu"
            and self.weight.dtype == torch.float32
            and blocks > 1
            and self.weight.numel() >= MIN_BLOCKED_WEIGHT
            and x.numel() <= MAX_BLOCKED_ROWS * self.in_features
            and self.weight.is_contiguous()
        ):
            return blocked_linear(x, self.weight, self.bias, blocks)
        return F.linear(x, self.weight, self.bias)
