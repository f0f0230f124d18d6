"""Bounded-memory attention (ABC, Peng et al. 2022, "ABC: Attention with Bounded-memory
Control"), the op under the causal `linformer` mixer, in three forms that take the same arguments
(q, k, v, control, scale, initial_state) and return (o, final state): the token-by-token
reference, the chunked form that training runs, and the one-token step that decoding runs.

Each token writes itself into n memory slots through its control weights alpha_t (a distribution
over the slots); the slot keys and values are the control-weighted averages of the keys and
values so far,

    K~_t[j] = sum_{i<=t} alpha_ij k_i / A_tj,   V~_t[j] = sum_{i<=t} alpha_ij v_i / A_tj,
    A_tj = sum_{i<=t} alpha_ij                  (the accumulated control),

and the query reads them with softmax attention over the slots:
o_t = softmax(q_t K~_t^T * scale) V~_t. The state is the three running sums (keys (B, H, n, D),
values (B, H, n, D), control (B, H, n)), a size independent of the length.
"""

from __future__ import annotations

import torch
from einops import rearrange

# accumulated control is a sum of softmax outputs, positive unless every term underflowed; the
# floor only turns 0 / 0 (slot never written) into 0 instead of NaN
_CONTROL_FLOOR = 1e-30

BoundedMemory = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def bounded_memory_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    control: torch.Tensor,
    scale: float,
    initial_state: BoundedMemory | None = None,
) -> tuple[torch.Tensor, BoundedMemory]:
    """Token-by-token definition, in float64 if given float64: the oracle for the chunked form.

    Args:
        q, k, v: (B, T, H, D).
        control: (B, T, H, n) control weights alpha (each row a distribution over the n slots).
        scale: the softmax temperature applied to q . K~.
        initial_state: (keys (B, H, n, D), values (B, H, n, D), control sum (B, H, n)).
    Returns:
        o (B, T, H, D) and the final state (same layout as initial_state).
    """
    B, T, H, D = q.shape
    n = control.shape[-1]
    if initial_state is None:
        key_sum = q.new_zeros(B, H, n, D)
        value_sum = q.new_zeros(B, H, n, D)
        control_sum = q.new_zeros(B, H, n)
    else:
        key_sum, value_sum, control_sum = (s.to(q.dtype) for s in initial_state)
    outputs = []
    for t in range(T):
        alpha = control[:, t]  # (B, H, n)
        key_sum = key_sum + alpha[..., None] * k[:, t, :, None, :]
        value_sum = value_sum + alpha[..., None] * v[:, t, :, None, :]
        control_sum = control_sum + alpha
        denominator = control_sum.clamp_min(_CONTROL_FLOOR)[..., None]
        slot_keys, slot_values = key_sum / denominator, value_sum / denominator
        scores = torch.einsum("bhd,bhnd->bhn", q[:, t], slot_keys) * scale
        outputs.append(torch.einsum("bhn,bhnd->bhd", scores.softmax(-1), slot_values))
    return torch.stack(outputs, dim=1), (key_sum, value_sum, control_sum)


def bounded_memory_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    control: torch.Tensor,
    scale: float,
    initial_state: BoundedMemory | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, BoundedMemory]:
    """The same function as the reference, parallel within chunks of `chunk_size` tokens.

    No (T, n, D) tensor of running memories is formed: within a chunk, with c the chunk's
    causal mask and M the memory carried in,
        q_t . K~_t[j] * A_tj = [(q k^T * c) alpha]_tj + q_t . M_keys[j]
        o_t = [((W alpha^T) * c) v]_t + W_t M_values,     W = softmax(scores) / A,
    two masked (C x C) products, the way chunked linear attention works. Shapes as the reference.
    """
    B, T, H, D = q.shape
    n = control.shape[-1]
    if initial_state is None:
        key_sum = q.new_zeros(B, H, n, D)
        value_sum = q.new_zeros(B, H, n, D)
        control_sum = q.new_zeros(B, H, n)
    else:
        key_sum, value_sum, control_sum = (s.to(q.dtype) for s in initial_state)
    q, k, v, control = (rearrange(t, "b t h d -> b h t d") for t in (q, k, v, control))
    outputs = []
    # split, not slicing in a loop: the backward of T / C slices would build T / C full-size
    # gradients (quadratic in T); split's backward is one concatenation
    pieces = zip(*(t.split(chunk_size, dim=2) for t in (q, k, v, control)))
    for qc, kc, vc, ac in pieces:
        size = qc.shape[2]
        causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
        accumulated = (control_sum[:, :, None] + ac.cumsum(dim=2)).clamp_min(_CONTROL_FLOOR)
        qk = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0.0)
        raw_scores = qk @ ac + qc @ key_sum.transpose(-1, -2)  # (B, H, C, n)
        weights = torch.softmax(raw_scores / accumulated * scale, dim=-1) / accumulated
        mixing = (weights @ ac.transpose(-1, -2)).masked_fill(~causal, 0.0)
        outputs.append(mixing @ vc + weights @ value_sum)
        key_sum = key_sum + ac.transpose(-1, -2) @ kc
        value_sum = value_sum + ac.transpose(-1, -2) @ vc
        control_sum = control_sum + ac.sum(dim=2)
    o = rearrange(torch.cat(outputs, dim=2), "b h t d -> b t h d")
    return o, (key_sum, value_sum, control_sum)


def bounded_memory_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    control: torch.Tensor,
    scale: float,
    initial_state: BoundedMemory,
) -> tuple[torch.Tensor, BoundedMemory]:
    """The recurrent form for one token (T = 1): write it into the slots, then read them.
    Shapes as the reference; `initial_state` is required (decoding always carries one)."""
    key_sum, value_sum, control_sum = initial_state
    alpha = control[:, 0, :, :, None]  # (B, H, n, 1)
    key_sum = key_sum + alpha * k[:, 0, :, None, :]
    value_sum = value_sum + alpha * v[:, 0, :, None, :]
    control_sum = control_sum + control[:, 0]
    denominator = control_sum.clamp_min(_CONTROL_FLOOR)[..., None]
    scores = torch.einsum("bhd,bhnd->bhn", q[:, 0], key_sum / denominator) * scale
    o = torch.einsum("bhn,bhnd->bhd", scores.softmax(-1), value_sum / denominator)
    return o[:, None], (key_sum, value_sum, control_sum)
