"""The CPU path (and the long-sequence path on every device): FFT for many new outputs, a direct
dot product per output for a few (decoding), both differentiable by autograd."""

from __future__ import annotations

import torch

# At or below this many new outputs the direct form wins on the CPU: a decode step costs one
# O(P * D) multiply-sum instead of three FFTs of about P + T points per channel. Measured with
# `zoo bench fft-conv` (D = 384, 1 thread, a shared 2-core machine, so rough): at P = 1024 a
# step is ~0.6 ms direct against several ms of FFT; the two cross between T = 8 and T = 16 for
# P from 128 to 4096.
DIRECT_MAX_T = 8


def fft_conv_fft(
    u: torch.Tensor,
    k: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `fft_conv_reference`, in O((P + T) log(P + T) * D).

    The convolution is linear, not circular: the full product is 2S - 1 long and an FFT of size
    n folds its index j >= n onto j - n <= 2S - 2 - n, so n >= S + T - 1 keeps the T outputs
    wanted, [S - T, S), clean (n = 2T - 1 with no past, about S for a decode step). n is rounded
    up to a power of two: an awkward size such as 2 * 4097 = 2 * 17 * 241 runs many times slower.
    bf16 / fp16 are computed in fp32 (torch.fft does not take bf16; half precision FFTs lose too
    much at long S).
    """
    B, T, D = u.shape
    x = u if initial_state is None else torch.cat([initial_state.to(u.dtype), u], dim=1)
    S = x.shape[1]
    n = 1 << max(S + T - 2, 1).bit_length()  # next power of two >= S + T - 1
    # (B, D, S) and (D, S) contiguous: pocketfft along a strided dim runs ~3x slower
    x32 = x.float().transpose(1, 2).contiguous()
    k32 = k[:, :S].float().contiguous()
    y = torch.fft.irfft(torch.fft.rfft(x32, n=n) * torch.fft.rfft(k32, n=n), n=n)[..., S - T : S]
    y = y.transpose(1, 2)
    if bias is not None:
        y = y + bias.float() * u.float()
    return y.to(u.dtype)


def fft_conv_direct(
    u: torch.Tensor,
    k: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract, one dot product over the history per new output: O(T * (P + T) * D)."""
    B, T, D = u.shape
    x = u if initial_state is None else torch.cat([initial_state.to(u.dtype), u], dim=1)
    P = x.shape[1] - T
    S = P + T
    # output t takes k[P + t - s] * x[s] for s <= P + t; in the time-reversed filter that lag
    # sits at row s + T - 1 - t, so every output reads one contiguous block of rows. (S, D) rows
    # and a multiply-sum beat einsum here, which permutes both operands for a batched matmul.
    flipped = k[:, :S].t().flip(0).to(u.dtype)  # (S, D)
    outputs = [(x[:, : P + t + 1] * flipped[T - 1 - t :]).sum(1) for t in range(T)]
    y = torch.stack(outputs, dim=1)
    if bias is not None:
        y = y + bias.to(u.dtype) * u
    return y


def fft_conv_torch(
    u: torch.Tensor,
    k: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """The CPU path: direct for T <= DIRECT_MAX_T new outputs, FFT otherwise."""
    if u.shape[1] <= DIRECT_MAX_T:
        return fft_conv_direct(u, k, bias, initial_state)
    return fft_conv_fft(u, k, bias, initial_state)
