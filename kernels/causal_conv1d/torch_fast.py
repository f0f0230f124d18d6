"""The CPU path: one grouped `conv1d` over the state-padded sequence."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange


def causal_conv1d_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as `causal_conv1d_reference`; x: (B, T, D), weight: (D, W)."""
    B, T, D = x.shape
    W = weight.shape[1]
    if initial_state is None:
        initial_state = x.new_zeros(B, W - 1, D)
    padded = torch.cat([initial_state.to(x.dtype), x], dim=1)
    y = F.conv1d(rearrange(padded, "b t d -> b d t"), weight.unsqueeze(1), bias, groups=D)
    y = rearrange(y, "b d t -> b t d")
    if activation is not None:
        y = F.silu(y)
    # row-major even for a batch of one (a compiled decode step guards on the state's strides)
    final_state = (padded[:, T:].clone(memory_format=torch.contiguous_format)
                   if output_final_state else None)
    return y, final_state
