"""`causal_conv1d`: depthwise causal convolution over time with a carried state.

Used by Mamba's and Hyena's short convolutions and, with width 2, by token shift. The state is
the last W - 1 inputs, so decoding one token at a time gives the same output as the whole
sequence at once.
"""

from __future__ import annotations

import importlib.util

import torch

from ..backend import OpBackends, resolve_backend
from .recurrent import causal_conv1d_recurrent
from .reference import causal_conv1d_reference
from .torch_fast import causal_conv1d_torch

ACTIVATIONS = (None, "silu", "swish")
OP_BACKENDS = OpBackends("causal_conv1d")


def _cuda_package_available() -> bool:
    return importlib.util.find_spec("causal_conv1d") is not None


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Depthwise causal conv: y[t] = act(bias + sum_k weight[:, k] * x[t - W + 1 + k]).

    Args:
        x: (B, T, D) inputs.
        weight: (D, W) one filter of width W per channel.
        bias: optional (D,).
        activation: None, "silu" or "swish" (the same function).
        initial_state: optional (B, W - 1, D): the inputs that came before x.
        output_final_state: also return the last W - 1 inputs, (B, W - 1, D).
        backend: "auto" (Triton on CUDA, PyTorch otherwise), "torch" (a dot product per
            channel for one token, a convolution otherwise), "triton" or "reference".
    Returns:
        (y, final_state): y (B, T, D); final_state or None.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"causal_conv1d: activation={activation!r} is not one of {ACTIVATIONS}")
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be (B, T, D), got shape {tuple(x.shape)}")
    B, T, D = x.shape
    if weight.dim() != 2 or weight.shape[0] != D:
        raise ValueError(f"causal_conv1d: weight must be (D={D}, W), got {tuple(weight.shape)}")
    W = weight.shape[1]
    if initial_state is not None and tuple(initial_state.shape) != (B, W - 1, D):
        raise ValueError(
            f"causal_conv1d: initial_state must be (B, W - 1, D) = {(B, W - 1, D)}, "
            f"got {tuple(initial_state.shape)}"
        )
    backend = resolve_backend(backend, x, OP_BACKENDS)
    if backend == "reference":
        return causal_conv1d_reference(x, weight, bias, activation, initial_state,
                                       output_final_state)
    if backend == "torch" and T == 1:
        # one token (decoding): a dot product per channel, cheaper on the CPU than a conv1d call
        return causal_conv1d_recurrent(x, weight, bias, activation, initial_state,
                                       output_final_state)
    if backend == "torch":
        return causal_conv1d_torch(x, weight, bias, activation, initial_state, output_final_state)
    if x.is_cuda and 2 <= W <= 4 and _cuda_package_available():
        return _causal_conv1d_cuda(x, weight, bias, activation, initial_state, output_final_state)
    from .triton_kernels import causal_conv1d_triton

    return causal_conv1d_triton(x, weight, bias, activation, initial_state, output_final_state)


def _causal_conv1d_cuda(x, weight, bias, activation, initial_state, output_final_state):
    """The `causal-conv1d` CUDA package, which takes channels-last (B, D, T) views."""
    from causal_conv1d import causal_conv1d_fn

    init = initial_state.transpose(1, 2) if initial_state is not None else None
    out = causal_conv1d_fn(
        x.transpose(1, 2), weight, bias, initial_states=init,
        return_final_states=output_final_state, activation="silu" if activation else None,
    )
    if output_final_state:
        y, final_state = out
        return y.transpose(1, 2), final_state.transpose(1, 2)
    return out.transpose(1, 2), None


__all__ = [
    "causal_conv1d", "causal_conv1d_recurrent", "causal_conv1d_reference", "causal_conv1d_torch",
]
