"""Calibration: what the calibrated compressors (Wanda's input norms, GPTQ's and SparseGPT's
Hessians) learn about each linear layer's inputs, from one pass of a zoo model's backbone over
calibration token ids, block by block.

As the reference code of Wanda, GPTQ and SparseGPT does: block i's linear layers see the inputs
that blocks 0..i-1, already compressed, produce; once block i has run, a callback compresses its
layers, and the block runs again so that block i+1 sees the compressed block's output. All layers
of a block see the block's uncompressed inputs (the references' default, not "true sequential").

The Hessian of a layer's squared output error ||XWᵀ - XŴᵀ||² in one row of W is H = 2 XᵀX / n over
its n calibration input rows X (n, in); GPTQ and SparseGPT read it through the upper Cholesky
factor of its dampened inverse (`inverse_hessian_factor`).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from .targets import CompressionError

# GPTQ's and SparseGPT's dampening: this fraction of H's mean diagonal is added to its diagonal
DAMPENING = 0.01
# why a calibrated compressor has nothing to go on for a layer: its weight is read directly
NEVER_RAN = "its forward never ran on the calibration tokens"


def backbone_blocks(model: nn.Module, method: str) -> tuple[str, nn.ModuleList]:
    """The model's residual blocks and their qualified name (a zoo model's model.layers)."""
    blocks = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(blocks, nn.ModuleList):
        raise CompressionError("method", method, "runs block by block and needs a model whose "
                               "blocks are model.model.layers (a zoo model)")
    return "model.layers", blocks


def check_calibration(calibration: object, method: str) -> None:
    """A CompressionError naming calibration unless it is token ids (B, T)."""
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2:
        shown = None if calibration is None else tuple(getattr(calibration, "shape", ()))
        raise CompressionError("calibration", shown,
                               f"{method} needs calibration token ids (B, T)")


@torch.no_grad()
def run_block_by_block(model: nn.Module, targets: list[tuple[str, nn.Linear]],
                       calibration: torch.Tensor,
                       observe: Callable[[str, torch.Tensor], None],
                       compress_block: Callable[[int, list[tuple[str, nn.Linear]]], None],
                       method: str) -> torch.Tensor:
    """One forward pass of the backbone over `calibration` (B, T) in eval mode (module doc):
    `observe(name, x)` gets every input (rows, in) a target layer's forward receives, except on
    a compressed block's rerun; `compress_block(index, layers)` runs when block `index` has run,
    before it runs again. Returns the backbone's output (B, T, d_model) through the compressed
    blocks: the output head's calibration input. Every target must lie inside a block."""
    prefix, blocks = backbone_blocks(model, method)
    by_block: dict[int, list[tuple[str, nn.Linear]]] = {}
    for name, linear in targets:
        match = re.match(rf"{re.escape(prefix)}\.(\d+)\.", name)
        if match is None:
            raise CompressionError("method", method, f"{name} lies outside the blocks")
        by_block.setdefault(int(match[1]), []).append((name, linear))
    rerunning = False

    def collect(name: str):
        def hook(module, args):
            if not rerunning:
                observe(name, args[0].detach().reshape(-1, args[0].shape[-1]))
        return hook

    def compress_after(index: int):
        def hook(block, args, kwargs, output):
            nonlocal rerunning
            if rerunning:
                return None
            compress_block(index, by_block.get(index, []))
            rerunning = True
            try:
                return block(*args, **kwargs)  # the compressed block's output for the next block
            finally:
                rerunning = False
        return hook

    handles = [linear.register_forward_pre_hook(collect(name)) for name, linear in targets]
    handles += [block.register_forward_hook(compress_after(i), with_kwargs=True)
                for i, block in enumerate(blocks)]
    device = next(model.parameters()).device
    was_training = model.training
    try:
        model.eval()
        hidden = model.model(calibration.to(device))[0]
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return hidden


class InputHessians:
    """Per layer name, the sum of x xᵀ over its calibration input rows (float64), from which
    `pop` gives H = 2 XᵀX / n."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}

    def add(self, name: str, x: torch.Tensor) -> None:
        """Add the input rows x (rows, in) of layer `name`."""
        x = x.to(torch.float64)
        product = x.T @ x
        if name in self.sums:
            self.sums[name] += product
            self.rows[name] += x.shape[0]
        else:
            self.sums[name], self.rows[name] = product, x.shape[0]

    def pop(self, name: str) -> torch.Tensor | None:
        """H (in, in) float64 of layer `name`, forgotten here; None when it saw no input."""
        if name not in self.sums:
            return None
        return self.sums.pop(name).mul_(2 / self.rows.pop(name))


def inverse_hessian_factor(hessian: torch.Tensor, dampening: float = DAMPENING) -> torch.Tensor:
    """U (in, in) float64, upper triangular with UᵀU = (H + λI)⁻¹, λ = dampening * mean(diag H).

    An input that never fired (H_jj = 0) gets H_jj = 1 first, as the references do; its column
    is then uncoupled from the others (its row and column of H are zero) and is compressed with
    no update. Row j of U, divided by U_jj, is the update that OBS spreads over the columns
    after j when column j changes, given that columns before j are fixed (GPTQ, Sec. 3).
    """
    h = hessian.to(torch.float64).clone()
    diagonal = h.diagonal()
    diagonal[diagonal == 0] = 1
    diagonal += dampening * diagonal.mean()
    # one Cholesky and one triangular inverse, not the reference's three cubic steps: with P
    # the order reversal and P H P = L Lᵀ, U = P L⁻¹ P is upper triangular and UᵀU = H⁻¹
    lower = torch.linalg.cholesky(h.flip(0, 1))
    identity = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return torch.linalg.solve_triangular(lower, identity, upper=False).flip(0, 1)
