"""The decode step of a pre-norm transformer stack in plain PyTorch: the oracle for the C++
kernel (same arguments, same in-place cache writes). Activations in float32, or float64 for
float64 weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..decode_attention.reference import decode_attention_reference
from ..precision import compute_dtype
from ..rms_norm.reference import rms_norm_reference

LAYER_FIELDS = (
    "mixer_norm", "q", "q_bias", "k", "k_bias", "v", "v_bias", "o", "o_bias",
    "ffn_norm", "gate", "gate_bias", "up", "up_bias", "down", "down_bias",
)
GLOBAL_FIELDS = ("embed", "embed_norm", "final_norm", "head", "inv_freq")


def _dequantized(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 dtype: torch.dtype) -> torch.Tensor:
    """The weight (N, K) that int8 codes (N, K), or int4 codes two a byte (N, K / 2: input 2j in
    the low nibble), stand for: code * scale (+ zero for int4), one scale per group of inputs."""
    if codes.dtype == torch.uint8:
        codes = torch.stack([codes & 0x0F, codes >> 4], dim=-1).flatten(-2)
    group = codes.shape[1] // scale.shape[1]
    weight = codes.to(dtype) * scale.to(dtype).repeat_interleave(group, dim=1)
    return weight if zero is None else weight + zero.to(dtype).repeat_interleave(group, dim=1)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            scale: torch.Tensor | None = None, zero: torch.Tensor | None = None) -> torch.Tensor:
    if scale is not None:
        weight = _dequantized(weight, scale, zero, x.dtype)
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def transformer_decode_step_reference(
    ids: torch.Tensor, layer_weights: list[torch.Tensor | None],
    globals_: list[torch.Tensor | None], kv: list[torch.Tensor], block_tables: torch.Tensor,
    lengths: torch.Tensor, positions: torch.Tensor, n_heads: int, n_kv_heads: int,
    head_dim: int, eps: float,
    activation: str, greedy: bool, scales: list[torch.Tensor | None] | None = None,
    zeros: list[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """See `zoo.kernels.transformer_decode_step`; ids (B,) -> logits (B, V) or tokens (B,).
    kv holds block pools (keys (N, H_kv, D, S), values (N, H_kv, S, D)); lengths and positions
    are (n_layers, B) or (B,)."""
    n_entries = len(layer_weights) + len(globals_)
    scales, zeros = scales or [None] * n_entries, zeros or [None] * n_entries
    g = dict(zip(GLOBAL_FIELDS, globals_))
    quant = {name: (scales[len(layer_weights) + i], zeros[len(layer_weights) + i])
             for i, name in enumerate(GLOBAL_FIELDS)}
    dtype = g["embed"].dtype
    compute = compute_dtype(dtype)
    B, D = ids.shape[0], head_dim
    n_layers = len(kv) // 2
    lengths = lengths.expand(n_layers, B).tolist()
    positions = positions.expand(n_layers, B).tolist()
    x = g["embed"][ids].to(compute)  # (B, d)
    if g["embed_norm"] is not None:
        x = rms_norm_reference(x, g["embed_norm"], eps)
    for layer in range(n_layers):
        f = dict(zip(LAYER_FIELDS, layer_weights[layer * 16 : (layer + 1) * 16]))
        fq = dict(zip(LAYER_FIELDS, zip(scales[layer * 16 : (layer + 1) * 16],
                                        zeros[layer * 16 : (layer + 1) * 16])))
        k_t, v_cache = kv[2 * layer], kv[2 * layer + 1]
        h = rms_norm_reference(x, f["mixer_norm"], eps)
        q = _linear(h, f["q"], f["q_bias"], *fq["q"]).view(B, n_heads, D)
        k = _linear(h, f["k"], f["k_bias"], *fq["k"]).view(B, n_kv_heads, D)
        v = _linear(h, f["v"], f["v_bias"], *fq["v"]).view(B, n_kv_heads, D)
        if g["inv_freq"] is not None:  # as zoo.layers.Rotary, cos and sin in the weights' dtype
            angles = (torch.tensor(positions[layer], dtype=torch.float32)[:, None]
                      * g["inv_freq"])[:, None, :]  # (B, 1, D / 2)
            cos = torch.cat([angles, angles], -1).cos().to(dtype).to(compute)
            sin = torch.cat([angles, angles], -1).sin().to(dtype).to(compute)
            q, k = (t * cos + torch.cat([-t[..., D // 2 :], t[..., : D // 2]], -1) * sin
                    for t in (q, k))
        S = v_cache.shape[2]
        rows = []
        for b, slot in enumerate(lengths[layer]):
            # the row's blocks in order, joined: (H_kv, D, blocks * S) and (H_kv, blocks * S, D)
            blocks = block_tables[b, : slot // S + 1]
            k_t[blocks[-1], :, :, slot % S] = k[b].to(dtype)
            v_cache[blocks[-1], :, slot % S] = v[b].to(dtype)
            keys = k_t[blocks].permute(1, 2, 0, 3).flatten(2)[..., : slot + 1]
            values = v_cache[blocks].transpose(0, 1).flatten(1, 2)[:, : slot + 1]
            rows.append(decode_attention_reference(q[b : b + 1], keys[None], values[None],
                                                   D**-0.5))
        attended = torch.cat(rows)
        x = x + _linear(attended.reshape(B, n_heads * D), f["o"], f["o_bias"], *fq["o"])
        if f["gate"] is None:
            continue
        h = rms_norm_reference(x, f["ffn_norm"], eps)
        hidden = _linear(h, f["gate"], f["gate_bias"], *fq["gate"])
        if activation == "swiglu":
            hidden = F.silu(hidden) * _linear(h, f["up"], f["up_bias"], *fq["up"])
        else:
            hidden = F.gelu(hidden)
        x = x + _linear(hidden, f["down"], f["down_bias"], *fq["down"])
    normed = rms_norm_reference(x, g["final_norm"], eps)
    logits = _linear(normed, g["head"], None, *quant["head"]).to(dtype)
    return logits.float().argmax(-1) if greedy else logits
