"""The one-token form, for decoding: the state and the token make one window of W inputs, and
the output is one dot product per channel with the filter (no convolution call to set up)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_recurrent(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`causal_conv1d_reference`'s contract for one token.

    x: (B, 1, D); weight: (D, W); bias: (D,) or None; initial_state: (B, W - 1, D), the inputs
    before x. Returns y (B, 1, D) and, when asked, the last W - 1 inputs (B, W - 1, D).
    """
    B, T, D = x.shape
    if T != 1:
        raise ValueError(f"causal_conv1d_recurrent: takes one token (T = 1), got T = {T}; "
                         "causal_conv1d runs longer inputs as one convolution")
    W = weight.shape[1]
    if initial_state is None:
        initial_state = x.new_zeros(B, W - 1, D)
    window = torch.cat([initial_state.to(x.dtype), x], dim=1)  # (B, W, D)
    y = (window * weight.t()).sum(dim=1, keepdim=True)
    if bias is not None:
        y = y + bias
    if activation is not None:
        y = F.silu(y)
    # row-major even for a batch of one (a compiled decode step guards on the state's strides)
    final_state = (window[:, 1:].clone(memory_format=torch.contiguous_format)
                   if output_final_state else None)
    return y, final_state
