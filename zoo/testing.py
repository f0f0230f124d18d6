"""Helpers shared by zoo's tests and by anyone testing a new op or mixer against zoo's contract."""

from __future__ import annotations

import torch


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    """max |reference - other| / max(|reference|), in float64; 0 when both are zero."""
    ref, got = reference.detach().double(), other.detach().double()
    scale = ref.abs().max().item()
    err = (ref - got).abs().max().item()
    return err / scale if scale > 0 else err


def assert_close(name: str, reference: torch.Tensor, other: torch.Tensor, ratio: float) -> None:
    """Fail with the tensor's name unless max abs error <= ratio * max |reference|."""
    assert reference.shape == other.shape, (
        f"{name}: shape {tuple(other.shape)} != reference {tuple(reference.shape)}"
    )
    assert torch.isfinite(other).all(), f"{name}: non-finite values"
    err = relative_error(reference, other)
    assert err <= ratio, f"{name}: relative error {err:.3e} > {ratio:.1e}"
