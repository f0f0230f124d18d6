"""`moe_experts`: the expert half of a mixture-of-experts FFN, given a routing.

Each token's K routed experts run on it and their outputs are summed with the routing weights.
The router (which experts, what weights, capacity) lives in zoo.layers.moe; this op only
computes y[n] = sum_k weights[n, k] * expert_{expert_ids[n, k]}(x[n]), with an expert id of -1
meaning "this slot was dropped" (it adds nothing and its weight gets a zero gradient).
"""

from __future__ import annotations

import torch

from ..backend import OpBackends, resolve_backend
from .reference import moe_experts_reference
from .torch_fast import moe_experts_torch, sort_slots_by_expert

ACTIVATIONS = ("swiglu", "gelu")
OP_BACKENDS = OpBackends("moe_experts")


def moe_experts(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    *,
    activation: str = "swiglu",
    backend: str = "auto",
) -> torch.Tensor:
    """Routed experts: y[n] = sum_k weights[n, k] * expert_{expert_ids[n, k]}(x[n]).

    An expert is down_proj[e] @ act(gate_up_proj[e] @ x): for "swiglu", act(h) = silu(gate) * up
    with gate = h[:I], up = h[I:] (Mixtral's stacked layout); for "gelu", act = gelu.

    Args:
        x: (N, D) tokens (flatten (B, T, D) first).
        gate_up_proj: (E, 2I, D) for "swiglu", (E, I, D) for "gelu".
        down_proj: (E, D, I).
        expert_ids: (N, K) integer expert of each token slot, in [0, E), or -1 for none.
        weights: (N, K) floating routing weight of each slot (gradients flow to it).
        activation: "swiglu" or "gelu".
        backend: "auto" (Triton on CUDA, PyTorch otherwise), "torch", "triton" or "reference".
    Returns:
        y: (N, D) in x's dtype.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"moe_experts: activation={activation!r} is not one of {ACTIVATIONS}")
    if x.dim() != 2:
        raise ValueError(f"moe_experts: x must be (N, D), got shape {tuple(x.shape)}")
    N, D = x.shape
    if down_proj.dim() != 3 or down_proj.shape[1] != D:
        raise ValueError(
            f"moe_experts: down_proj must be (E, D={D}, I), got {tuple(down_proj.shape)}"
        )
    E, _, I = down_proj.shape
    rows = 2 * I if activation == "swiglu" else I
    if tuple(gate_up_proj.shape) != (E, rows, D):
        raise ValueError(
            f"moe_experts: gate_up_proj must be (E, {'2I' if activation == 'swiglu' else 'I'}, D)"
            f" = {(E, rows, D)} for activation={activation!r}, got {tuple(gate_up_proj.shape)}"
        )
    if expert_ids.dim() != 2 or expert_ids.shape[0] != N or expert_ids.is_floating_point():
        raise ValueError(
            f"moe_experts: expert_ids must be integer (N={N}, K), got "
            f"{expert_ids.dtype} {tuple(expert_ids.shape)}"
        )
    if tuple(weights.shape) != tuple(expert_ids.shape) or not weights.is_floating_point():
        raise ValueError(
            f"moe_experts: weights must be floating {tuple(expert_ids.shape)} like expert_ids, "
            f"got {weights.dtype} {tuple(weights.shape)}"
        )
    # a value check costs a device sync (a graph break under torch.compile), so only on the
    # CPU in eager mode; elsewhere ids outside [0, E) are treated as dropped by every backend
    # but the reference
    if not expert_ids.is_cuda and not torch.compiler.is_compiling() and expert_ids.numel() and (
        expert_ids.min() < -1 or expert_ids.max() >= E
    ):
        raise ValueError(
            f"moe_experts: expert_ids must lie in [0, {E}) or be -1 (dropped), got values in "
            f"[{expert_ids.min().item()}, {expert_ids.max().item()}]"
        )
    backend = resolve_backend(backend, x, OP_BACKENDS)
    if backend == "reference":
        return moe_experts_reference(x, gate_up_proj, down_proj, expert_ids, weights, activation)
    if backend == "torch":
        return moe_experts_torch(x, gate_up_proj, down_proj, expert_ids, weights, activation)
    from .triton_kernels import moe_experts_triton

    return moe_experts_triton(x, gate_up_proj, down_proj, expert_ids, weights, activation)


__all__ = ["moe_experts", "moe_experts_reference", "moe_experts_torch", "sort_slots_by_expert"]
