"""Causal long convolution written directly, as a Toeplitz product: the oracle for the others."""

from __future__ import annotations

import torch


def fft_conv_reference(
    u: torch.Tensor,
    k: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[t] = sum_{j=0}^{P+t} k[:, j] * x[P + t - j] + bias * u[t], with x = cat(past, u).

    u: (B, T, D) new inputs; k: (D, L) one filter per channel, L >= P + T;
    bias: optional (D,) skip term; initial_state: optional (B, P, D), the P inputs before u.
    Returns y (B, T, D). Costs O(T * (P + T) * D): clear, not fast.
    """
    B, T, D = u.shape
    past = initial_state if initial_state is not None else u.new_zeros(B, 0, D)
    P = past.shape[1]
    x = torch.cat([past.to(u.dtype), u], dim=1)  # (B, S, D)
    S = P + T
    lag = (P + torch.arange(T, device=u.device))[:, None] - torch.arange(S, device=u.device)
    causal = lag >= 0  # input s reaches output t only from the past
    toeplitz = k[:, lag.clamp(min=0)] * causal.to(k.dtype)  # (D, T, S)
    y = torch.einsum("dts,bsd->btd", toeplitz.to(u.dtype), x)
    if bias is not None:
        y = y + bias.to(u.dtype) * u
    return y
