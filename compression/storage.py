"""What a model's weights cost: how many weights it stands for, the bytes that hold them, and the
bytes one decode step reads (the figure decoding is bound by on a CPU)."""

from __future__ import annotations

import torch
from torch import nn

from .quantized_linear import QuantizedLinear


def _unique_parameters(model: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """(owner, name, tensor) for every parameter once (tied weights once)."""
    seen, found = set(), []
    for owner in model.modules():
        for name, tensor in owner.named_parameters(recurse=False):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                found.append((owner, name, tensor))
    return found


def _nbytes(tensor: torch.Tensor, float_dtype: torch.dtype | None) -> int:
    if float_dtype is not None and tensor.is_floating_point():
        return tensor.numel() * torch.empty((), dtype=float_dtype).element_size()
    return tensor.numel() * tensor.element_size()


def logical_parameters(model: nn.Module) -> int:
    """The parameter count of the float model this one stands for: a QuantizedLinear counts its
    in x out weights (and bias), not its codes and scales."""
    total = 0
    for owner, name, tensor in _unique_parameters(model):
        if isinstance(owner, QuantizedLinear):
            if name == "qweight":
                total += owner.in_features * owner.out_features
            elif name == "bias":
                total += tensor.numel()
        else:
            total += tensor.numel()
    return total


def weight_bytes(model: nn.Module, float_dtype: torch.dtype | None = None) -> int:
    """Bytes of every parameter once (codes, scales and zeros included), floating ones counted
    at `float_dtype` when given (what the model takes after .to(float_dtype))."""
    return sum(_nbytes(tensor, float_dtype) for _, _, tensor in _unique_parameters(model))


def decode_read_bytes(model: nn.Module, float_dtype: torch.dtype | None = None) -> int:
    """Weight bytes one decode step reads: every parameter once, except that an input embedding
    table not shared with the output head is read one row per token."""
    total = weight_bytes(model, float_dtype)
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # a QuantizedLinear's `weight` is computed, never the embedding's table
    shares_table = (embedding is not None and isinstance(head, nn.Linear)
                    and head.weight is embedding.weight)
    if embedding is not None and not shares_table:
        table = embedding.weight
        total -= _nbytes(table, float_dtype) - _nbytes(table[0], float_dtype)
    return total
