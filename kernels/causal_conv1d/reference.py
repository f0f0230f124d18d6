"""Depthwise causal convolution over time, written for clarity: the oracle for the other forms."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y[t] = act(bias + sum_k weight[:, k] * x[t - (W - 1) + k]).

    x: (B, T, D); weight: (D, W); initial_state: (B, W - 1, D), the W - 1 inputs before x.
    Returns y (B, T, D) and, when asked, the last W - 1 inputs (B, W - 1, D).
    """
    B, T, D = x.shape
    W = weight.shape[1]
    if initial_state is None:
        initial_state = x.new_zeros(B, W - 1, D)
    padded = torch.cat([initial_state.to(x.dtype), x], dim=1)  # (B, T + W - 1, D)
    y = torch.zeros_like(x)
    for k in range(W):
        y = y + weight[:, k] * padded[:, k : k + T]
    if bias is not None:
        y = y + bias
    if activation is not None:
        y = F.silu(y)
    final_state = padded[:, T:].clone() if output_final_state else None
    return y, final_state
