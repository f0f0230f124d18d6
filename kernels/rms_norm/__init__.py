"""`rms_norm`: root-mean-square normalisation with a learned scale, fused in Triton."""

from __future__ import annotations

import torch

from ..backend import OpBackends, resolve_backend
from .reference import rms_norm_reference
from .torch_fast import rms_norm_torch

OP_BACKENDS = OpBackends("rms_norm")


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, backend: str = "auto"
) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2, -1) + eps).

    Args:
        x: (..., N), e.g. (B, T, D).
        weight: (N,).
        eps: added to the mean square.
        backend: "auto" (Triton on CUDA, PyTorch otherwise), "torch", "triton" or "reference".
    """
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"rms_norm: weight must be ({x.shape[-1]},) to match x's last dim, "
            f"got {tuple(weight.shape)}"
        )
    backend = resolve_backend(backend, x, OP_BACKENDS)
    if backend == "reference":
        return rms_norm_reference(x, weight, eps)
    if backend == "torch":
        return rms_norm_torch(x, weight, eps)
    from .triton_kernels import rms_norm_triton

    return rms_norm_triton(x, weight, eps)


__all__ = ["rms_norm", "rms_norm_reference", "rms_norm_torch"]
