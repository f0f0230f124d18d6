"""Mixture-of-experts expert computation, written for clarity: the oracle for the other forms.

Every expert runs on every token (dense), and the routing only masks and weights the results,
so there is no permutation here for a bug to hide in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expert_activation(h: torch.Tensor, activation: str) -> torch.Tensor:
    """(..., 2I) -> (..., I) for "swiglu" (gate first, then up, as Mixtral's gate_up_proj);
    (..., I) -> (..., I) for "gelu"."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


def moe_experts_reference(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    activation: str = "swiglu",
) -> torch.Tensor:
    """y[n] = sum_k weights[n, k] * expert_{expert_ids[n, k]}(x[n]); ids of -1 add nothing.

    x: (N, D); gate_up_proj: (E, 2I, D) for swiglu, (E, I, D) for gelu; down_proj: (E, D, I);
    expert_ids, weights: (N, K). Returns y (N, D) in x's dtype.
    """
    E = gate_up_proj.shape[0]
    h = torch.einsum("nd,ejd->enj", x, gate_up_proj)  # (E, N, 2I or I): every expert, every token
    out = torch.einsum("eni,edi->end", expert_activation(h, activation), down_proj)  # (E, N, D)
    # combine[n, e] = sum of the weights of the slots of token n routed to expert e
    onehot = (expert_ids.unsqueeze(-1) == torch.arange(E, device=x.device)).to(weights.dtype)
    combine = (onehot * weights.unsqueeze(-1)).sum(1)  # (N, E)
    return torch.einsum("ne,end->nd", combine.to(out.dtype), out).to(x.dtype)
