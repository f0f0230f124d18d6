"""`fft_conv`: causal long convolution of a sequence with one filter per channel, as long as
the sequence (Hyena's long convolutions, H3, S4 kernels applied as convolutions).

Three forms of one sum, y[t] = sum_{j <= P + t} k[:, j] * x[P + t - j] + bias * u[t]:
- reference: the Toeplitz product, O(T * S * D) with S = P + T; the oracle.
- torch: FFT (rfft, multiply, irfft, crop), O(S log S * D), on every device; for at most
  `DIRECT_MAX_T` new outputs (a decode step) a direct multiply-sum over the history instead.
- triton: the direct form, tiled over (t, s) lag pairs, forward and backward; it reads the
  history in place, so a decode step is one pass over the cache and one launch.

`backend="auto"`: on CUDA the Triton direct form for T <= TRITON_MAX_T new outputs, the FFT
otherwise; on the CPU the torch path. The CUDA rule is argued, not measured (no GPU was at hand
when it was written; `zoo bench fft-conv --device cuda` measures it): a decode step is memory
bound, and the direct form reads the S * D history once where the FFT path writes and reads
about six S * D complex buffers across five launches, so it wins by several times at T = 1. The
direct form does T * S * D multiply-adds without tensor cores against roughly
15 * log2(2S) * S * D flops of FFT work, so its advantage is gone by T of a few dozen; 64 is
where a chunk (speculative verification, a short prompt) still gains from one launch.
"""

from __future__ import annotations

import torch

from ..backend import OpBackends, resolve_backend
from .reference import fft_conv_reference
from .torch_fast import DIRECT_MAX_T, fft_conv_direct, fft_conv_fft, fft_conv_torch

TRITON_MAX_T = 64
OP_BACKENDS = OpBackends("fft_conv")


def fft_conv(
    u: torch.Tensor,
    k: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    initial_state: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal long convolution: y[t] = sum_{j=0}^{P+t} k[:, j] * x[P + t - j] + bias * u[t].

    Args:
        u: (B, T, D) inputs.
        k: (D, L) one filter per channel, L >= P + T (lags past P + T - 1 are not read).
        bias: optional (D,) skip term (Hyena's "D" term).
        initial_state: optional (B, P, D), the P inputs before u, x = cat(initial_state, u).
            A long convolution's state is its whole input history: the caller keeps it (e.g.
            in a preallocated buffer) and passes a view; no final state is returned.
        backend: "auto", "torch", "triton" or "reference" (see the module docstring).
    Returns:
        y: (B, T, D), u's dtype.
    """
    if u.dim() != 3:
        raise ValueError(f"fft_conv: u must be (B, T, D), got shape {tuple(u.shape)}")
    B, T, D = u.shape
    P = 0
    if initial_state is not None:
        if (initial_state.dim() != 3 or initial_state.shape[0] != B
                or initial_state.shape[2] != D):
            raise ValueError(
                f"fft_conv: initial_state must be (B={B}, P, D={D}), "
                f"got {tuple(initial_state.shape)}"
            )
        P = initial_state.shape[1]
    if k.dim() != 2 or k.shape[0] != D:
        raise ValueError(f"fft_conv: k must be (D={D}, L), got {tuple(k.shape)}")
    if k.shape[1] < P + T:
        raise ValueError(
            f"fft_conv: k has L={k.shape[1]} taps but P + T = {P} + {T} = {P + T} are needed "
            "(the filter must be at least as long as the history plus the new inputs)"
        )
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"fft_conv: bias must be (D={D},), got {tuple(bias.shape)}")
    if backend == "auto" and u.is_cuda and T > TRITON_MAX_T:
        backend = "torch"
    backend = resolve_backend(backend, u, OP_BACKENDS)
    if backend == "reference":
        return fft_conv_reference(u, k, bias, initial_state)
    if backend == "torch":
        return fft_conv_torch(u, k, bias, initial_state)
    from .triton_kernels import fft_conv_triton

    return fft_conv_triton(u, k, bias, initial_state)


__all__ = [
    "DIRECT_MAX_T", "TRITON_MAX_T", "fft_conv", "fft_conv_direct", "fft_conv_fft",
    "fft_conv_reference", "fft_conv_torch",
]
