"""The CPU path: sort the token slots by expert once, then one pair of matmuls per expert on the
gathered rows (index_select) and a weighted scatter-add back (index_add_). A handful of tokens
(decoding) gathers the chosen experts' weights instead (`gathered_experts`)."""

from __future__ import annotations

import torch

from .reference import expert_activation


def sort_slots_by_expert(
    expert_ids: torch.Tensor, n_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group the N * K token slots by expert.

    expert_ids: (N, K), -1 for a slot that goes nowhere (dropped by capacity).
    Returns (order, counts): order (N * K,) the flat slot indices sorted by expert (stable, so
    tokens keep their order within an expert; dropped slots last), counts (E,) slots per expert.
    The token of slot s is s // K.
    """
    flat = expert_ids.reshape(-1)
    # dropped slots sort after every expert; stable keeps the token order inside an expert
    keys = torch.where(flat < 0, torch.full_like(flat, n_experts), flat)
    order = torch.argsort(keys, stable=True)
    counts = torch.bincount(keys, minlength=n_experts + 1)[:n_experts]
    return order, counts


def moe_experts_torch(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    activation: str = "swiglu",
) -> torch.Tensor:
    """Same contract as `moe_experts_reference`; x: (N, D), expert_ids / weights: (N, K)."""
    N, K = expert_ids.shape
    E = gate_up_proj.shape[0]
    if N * K <= E:
        return gathered_experts(x, gate_up_proj, down_proj, expert_ids, weights, activation)
    order, counts = sort_slots_by_expert(expert_ids, E)
    # one host sync for the counts; the per-expert loop is what CPU MoE code does (Mixtral's too)
    counts = counts.tolist()
    n_routed = sum(counts)
    tokens = order[:n_routed] // K
    # gather every routed row once, in expert order: each expert then reads a contiguous slice
    xs = x.index_select(0, tokens)
    # split / unbind rather than slicing and indexing: their backward assembles the gradient
    # once (cat / stack), where each slice's or index's backward would write a zero-filled
    # gradient of the whole tensor, E times over
    gate_up, down = gate_up_proj.unbind(0), down_proj.unbind(0)
    outs = []
    for e, rows in enumerate(xs.split(counts)):
        if rows.shape[0]:
            h = rows @ gate_up[e].t()
            outs.append(expert_activation(h, activation) @ down[e].t())
    y = torch.zeros_like(x)
    if outs:
        w = weights.reshape(-1).index_select(0, order[:n_routed])
        out = torch.cat(outs) * w.to(outs[0].dtype).unsqueeze(-1)
        y.index_add_(0, tokens, out.to(x.dtype))
    return y


def gathered_experts(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    activation: str = "swiglu",
) -> torch.Tensor:
    """Few tokens (decoding): each slot gathers its expert's weights and the slots run as one
    batched product. Reads only the chosen experts, with no sort and no host sync (so the decode
    step compiles whole). Same contract as `moe_experts_torch`."""
    N, K = expert_ids.shape
    slots = expert_ids.reshape(-1)
    gate_up = gate_up_proj.index_select(0, slots.clamp(min=0))  # (N * K, 2I or I, D)
    down = down_proj.index_select(0, slots.clamp(min=0))  # (N * K, D, I)
    rows = x.repeat_interleave(K, dim=0).unsqueeze(-1)  # (N * K, D, 1): slot s is token s // K
    h = expert_activation(torch.bmm(gate_up, rows.to(gate_up.dtype)).squeeze(-1), activation)
    out = torch.bmm(down, h.unsqueeze(-1)).squeeze(-1)  # (N * K, D)
    w = torch.where(slots >= 0, weights.reshape(-1), 0.0).to(out.dtype)  # dropped slots add 0
    return (out * w.unsqueeze(-1)).view(N, K, -1).sum(1).to(x.dtype)
