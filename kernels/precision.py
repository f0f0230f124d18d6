"""The precision every op and state computes in: float64 stays float64, everything else
(float32, bfloat16, float16) computes and keeps its running state in float32."""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 -> float64 (the references' precision); any other dtype -> float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
