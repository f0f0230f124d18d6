"""Decode attention in Triton, split over the context (flash-decoding): each program reads one
span of the cache for one KV head and all the query heads that share it, keeping a running max,
sum and weighted values; a few PyTorch ops merge the spans. Forward only: decoding runs without
gradients, and training attends through SDPA."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_attention_kernel(
    q_ptr, kt_ptr, v_ptr, max_ptr, sum_ptr, acc_ptr,
    L, tokens_per_split, n_splits, scale,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kd,
    stride_vb, stride_vh, stride_vl,
    H_KV: tl.constexpr, GROUPS: tl.constexpr, D: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    bh = tl.program_id(0)  # b * H_kv + kv head
    split = tl.program_id(1)
    b, h = bh // H_KV, bh % H_KV
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    mask_g, mask_d = g < GROUPS, d < D
    q = tl.load(
        q_ptr + b * stride_qb + (h * GROUPS + g)[:, None] * stride_qh + d[None, :],
        mask=mask_g[:, None] & mask_d[None, :], other=0.0,
    ).to(tl.float32) * scale  # (G, D)
    running_max = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, L)
    kt_base = kt_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    for l0 in range(start, end, BLOCK_L):
        l = l0 + tl.arange(0, BLOCK_L)
        mask_l = l < end
        keys_t = tl.load(
            kt_base + d[:, None] * stride_kd + l[None, :],
            mask=mask_d[:, None] & mask_l[None, :], other=0.0,
        ).to(tl.float32)  # (D, L)
        # a handful of query heads is too few rows for tl.dot: a broadcast product instead
        scores = tl.sum(q[:, :, None] * keys_t[None, :, :], axis=1)  # (G, L)
        scores = tl.where(mask_l[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        rescale = tl.exp(running_max - new_max)
        p = tl.exp(scores - new_max[:, None])
        running_sum = running_sum * rescale + tl.sum(p, axis=1)
        values = tl.load(
            v_base + l[:, None] * stride_vl + d[None, :],
            mask=mask_l[:, None] & mask_d[None, :], other=0.0,
        ).to(tl.float32)  # (L, D)
        acc = acc * rescale[:, None] + tl.sum(p[:, :, None] * values[None, :, :], axis=1)
        running_max = new_max
    row = (bh * n_splits + split) * GROUPS + g  # (B * H_kv, n_splits, G)
    tl.store(max_ptr + row, running_max, mask=mask_g)
    tl.store(sum_ptr + row, running_sum, mask=mask_g)
    tl.store(acc_ptr + row[:, None] * D + d[None, :], acc, mask=mask_g[:, None] & mask_d[None, :])


def decode_attention_triton(
    q: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor, scale: float,
    target_programs: int = 128,
) -> torch.Tensor:
    """q: (B, H, D); keys_t: (B, H_kv, D, L); values: (B, H_kv, L, D) -> (B, H, D).

    The context splits so that about `target_programs` programs share the work (one per KV
    head alone would leave most of a GPU idle at batch 1)."""
    B, H, D = q.shape
    H_kv, L = keys_t.shape[1], keys_t.shape[3]
    groups = H // H_kv
    q = q.contiguous()
    if keys_t.stride(-1) != 1:
        keys_t = keys_t.contiguous()
    if values.stride(-1) != 1:
        values = values.contiguous()
    block_l = 64
    splits_wanted = max(1, target_programs // (B * H_kv))
    tokens_per_split = max(block_l, triton.cdiv(triton.cdiv(L, splits_wanted), block_l) * block_l)
    n_splits = triton.cdiv(L, tokens_per_split)
    partial_max = torch.empty(B * H_kv, n_splits, groups, device=q.device, dtype=torch.float32)
    partial_sum = torch.empty_like(partial_max)
    partial_acc = torch.empty(B * H_kv, n_splits, groups, D, device=q.device,
                              dtype=torch.float32)
    _decode_attention_kernel[(B * H_kv, n_splits)](
        q, keys_t, values, partial_max, partial_sum, partial_acc,
        L, tokens_per_split, n_splits, scale,
        q.stride(0), q.stride(1),
        keys_t.stride(0), keys_t.stride(1), keys_t.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        H_KV=H_kv, GROUPS=groups, D=D,
        BLOCK_G=max(triton.next_power_of_2(groups), 2), BLOCK_D=triton.next_power_of_2(D),
        BLOCK_L=block_l,
    )
    # merge the spans: rescale each span's sums to the overall max
    weight = (partial_max - partial_max.amax(dim=1, keepdim=True)).exp()
    total = (partial_sum * weight).sum(dim=1)
    out = (partial_acc * weight[..., None]).sum(dim=1) / total[..., None]
    return out.reshape(B, H, D).to(q.dtype)
