"""Kernelised linear attention (Katharopoulos et al. 2020) with selectable feature maps.

softmax(q k^T) v is replaced by phi(q) (sum_s phi(k_s) v_s^T), optionally divided by
phi(q) . sum_s phi(k_s) (the normalised form of the paper, eq. 5). The running sum is the
state: (F, D) numbers per KV head (plus the key sum z when normalised), whatever the length.
Feature maps come from `feature_maps.py` by name. Projections are named q_proj, k_proj, v_proj,
o_proj as in `attention.py`, so a softmax-attention layer's weights copy over by name when an
attention model is linearised; with the teacher's `rope_theta`, q and k also carry its rotary
positions, so the feature maps see the q and k its softmax saw (LoLCATs, Zhang et al. 2024).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from einops import rearrange

from zoo.kernels import compute_dtype
from zoo.kernels.linear_attention import NORMALIZE_EPS, linear_attention

from .attention import rotary_at, row_positions
from .base import Mixer, MixerState, fill_padding
from .feature_maps import build_feature_map
from .linear import Linear
from .norms import RMSNorm
from .registry import register_mixer
from .rotary import Rotary


@dataclasses.dataclass
class LinearAttentionState(MixerState):
    """sum_s phi(k_s) v_s^T per KV head: (B, H_kv, F, D), or (B, H_kv, F, D + 1) when
    normalised (the last column is the key sum z). float32 (float64 for float64 activations).
    position: tokens seen so far (the next token's rotary position), one host integer for the
    batch as attention's state keeps it: no tensor, so no bytes per sequence. After padding
    with rotary positions, next_positions (B,) long: each row's next position (its real tokens
    counted), None otherwise."""

    memory: torch.Tensor
    position: int = 0
    next_positions: torch.Tensor | None = None


@register_mixer("linear_attention")
class LinearAttention(Mixer):
    """Causal linear attention. x: (B, T, d_model) -> (B, T, d_model).

    Grouped KV heads: queries have n_heads heads, keys and values n_kv_heads; with no decay the
    memory of every query head in a group is the same sum, so the state is kept once per KV head
    and shared out to the group's query heads on entry. Options: `feature_map` (one of
    feature_maps.FEATURE_MAPS) and `feature_dim` (favor+ only); `normalize` (divide by
    phi(q) . z); `output_norm` (RMSNorm over each head's output, as fla and TransNormer use to
    replace or steady that division); `output_gate` (o * silu(g_proj(x)), per channel).

    Positions: `rope_theta` (None, the default: none) rotates q and k as attention does.
    `feature_maps_after_rotary` True: the feature maps see the rotated q and k, phi(R_t q_t);
    False: they see q and k before rotary and the rotation acts on the features, R_t phi(q_t),
    in the numerator only (RoFormer's linear attention, Su et al. 2021, eq. 19): the
    denominator keeps phi(q_t) . sum phi(k_s), which rotated features could bring to zero.
    Training runs the op's chunked form, decoding (T = 1) its recurrent step.
    """

    state_class = LinearAttentionState
    bounded = True
    test_variants = [
        {"feature_map": "relu", "n_heads": 4, "n_kv_heads": 2, "output_norm": True},
        {"feature_map": "favor+", "feature_dim": 24, "n_heads": 4},
        {"feature_map": "hedgehog", "n_heads": 2, "n_kv_heads": 1, "output_gate": True},
        {"feature_map": "identity", "normalize": False, "output_norm": True,
         "output_gate": True, "n_heads": 4, "chunk_size": 8},
        {"feature_map": "hedgehog", "n_heads": 4, "n_kv_heads": 2, "rope_theta": 10000.0,
         "chunk_size": 8},
        {"feature_map": "hedgehog", "n_heads": 4, "n_kv_heads": 2, "rope_theta": 500.0,
         "feature_maps_after_rotary": False, "chunk_size": 8},
        {"feature_map": "elu+1", "n_heads": 2, "rope_theta": 10000.0,
         "feature_maps_after_rotary": False, "normalize": False, "output_norm": True},
    ]

    def __init__(
        self,
        d_model: int,
        layer_idx: int = 0,
        *,
        n_heads: int | None = None,
        n_kv_heads: int | None = None,
        feature_map: str = "elu+1",
        feature_dim: int | None = None,
        normalize: bool = True,
        output_norm: bool = False,
        output_gate: bool = False,
        norm_eps: float = 1e-5,
        qkv_bias: bool = False,
        chunk_size: int = 64,
        rope_theta: float | None = None,
        feature_maps_after_rotary: bool = True,
    ):
        super().__init__(d_model, layer_idx)
        n_heads = n_heads or max(1, d_model // 64)
        n_kv_heads = n_kv_heads or n_heads
        if d_model % n_heads:
            raise ValueError(
                f"linear_attention: d_model={d_model} is not divisible by n_heads={n_heads}"
            )
        if n_heads % n_kv_heads:
            raise ValueError(
                f"linear_attention: n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}"
            )
        if normalize and feature_map == "identity":
            raise ValueError(
                "linear_attention: normalize=True divides by phi(q) . sum phi(k), which the "
                "signed features of feature_map='identity' can bring to zero; use "
                "normalize=False (output_norm=True steadies the scale instead) or a "
                "non-negative map ('elu+1', 'relu', 'favor+', 'hedgehog')"
            )
        if rope_theta is not None and (
            isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float))
            or not rope_theta > 0
        ):
            raise ValueError(
                f"linear_attention: rope_theta={rope_theta!r} must be a positive rotary base "
                "(the teacher attention's, e.g. 10000.0) or None (no positions)"
            )
        head_dim = d_model // n_heads
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.normalize, self.chunk_size = normalize, chunk_size
        self.feature_maps_after_rotary = feature_maps_after_rotary
        self.q_proj = Linear(d_model, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = Linear(n_heads * head_dim, d_model, bias=False)
        self.feature_map = build_feature_map(
            feature_map, head_dim, n_heads, n_kv_heads, feature_dim=feature_dim
        )
        self.rotary = None
        if rope_theta is not None:
            self.rotary = Rotary(self._rotated_dim(rope_theta), float(rope_theta))
        self.o_norm = RMSNorm(head_dim, norm_eps) if output_norm else None
        self.g_proj = Linear(d_model, n_heads * head_dim, bias=False) if output_gate else None

    @property
    def groups(self) -> int:
        return self.n_heads // self.n_kv_heads

    def _rotated_dim(self, rope_theta: float) -> int:
        """Channels the rotation acts on: q and k's head_dim after rotary, the features' count
        before it. Rotary turns pairs of channels, so the count must be even."""
        if self.feature_maps_after_rotary:
            rotated, what = self.head_dim, f"head_dim = d_model / n_heads = {self.head_dim}"
        else:
            rotated = self.feature_map.feature_dim
            what = f"the feature map's feature count {rotated}"
        if rotated % 2:
            raise ValueError(
                f"linear_attention: rope_theta={rope_theta} with feature_maps_after_rotary="
                f"{self.feature_maps_after_rotary} rotates pairs of channels and needs an even "
                f"count; {what} is odd"
            )
        return rotated

    def _memory_shape(self, batch_size: int) -> tuple[int, ...]:
        value_dim = self.head_dim + int(self.normalize)
        return (batch_size, self.n_kv_heads, self.feature_map.feature_dim, value_dim)

    def init_state(self, batch_size, device=None, dtype=None):
        device = device or self.q_proj.weight.device
        # the op keeps its running sum in float32 (float64 for float64 inputs)
        return LinearAttentionState(
            torch.zeros(self._memory_shape(batch_size), device=device, dtype=compute_dtype(dtype))
        )

    def state_size(self, seq_len, dtype=torch.float32):
        element = compute_dtype(dtype).itemsize
        shape = self._memory_shape(1)
        return element * shape[1] * shape[2] * shape[3]

    def forward(self, x, state=None, padding_mask=None):
        self.check_input(x, state, padding_mask)
        T = x.shape[1]
        position = 0 if state is None else state.position
        next_positions = None if state is None else state.next_positions
        rotation = self._rotation(x, position, next_positions, padding_mask)
        if self.rotary is not None and (padding_mask is not None or next_positions is not None):
            next_positions = rotation[2]
        split = "b t (h d) -> b t h d"
        q = rearrange(self.q_proj(x), split, d=self.head_dim)
        k = rearrange(self.k_proj(x), split, d=self.head_dim)
        v = rearrange(self.v_proj(x), split, d=self.head_dim)
        rotate_features = self.rotary is not None and not self.feature_maps_after_rotary
        if self.rotary is not None and self.feature_maps_after_rotary:
            cos, sin = (part.to(q.dtype) for part in rotation[:2])
            q, k = Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)
        q, k = self.feature_map(q, "query"), self.feature_map(k, "key")
        # a padded token adds nothing to the running sums (no decay here to hold at 1)
        k, v = fill_padding(k, padding_mask), fill_padding(v, padding_mask)
        memory = None if state is None else state.memory
        if self.groups > 1:
            # query head h reads KV head h // groups, as attention's enable_gqa does
            k = k.repeat_interleave(self.groups, dim=2)
            v = v.repeat_interleave(self.groups, dim=2)
            if memory is not None:
                memory = memory.repeat_interleave(self.groups, dim=1)
        if rotate_features:
            o, final = self._rotated_feature_attention(q, k, v, rotation[:2], memory)
        else:
            o, final = linear_attention(
                q, k, v, scale=self.feature_map.kernel_scale, normalize=self.normalize,
                initial_state=memory, output_final_state=True, chunk_size=self.chunk_size,
            )
        if self.groups > 1:
            # every head of a group holds the same sum; a copy, not a view holding all heads
            final = final[:, :: self.groups].contiguous()
        if self.o_norm is not None:
            o = self.o_norm(o)
        o = rearrange(o, "b t h d -> b t (h d)")
        if self.g_proj is not None:
            o = o * F.silu(self.g_proj(x))
        # gradients stop at the carried state (the contract allows it; decoding needs no graph)
        y = fill_padding(self.o_proj(o), padding_mask)
        return y, LinearAttentionState(final.detach(), position + T, next_positions)

    def _rotation(self, x: torch.Tensor, position: int, next_positions: torch.Tensor | None,
                  padding_mask: torch.Tensor | None) -> tuple:
        """(cos, sin, each row's next position) of x's tokens, in float32, or () without
        rotary. Without padding they are positions position..; with it (now or before) each
        row counts only its real tokens, as the row alone would."""
        if self.rotary is None:
            return ()
        T = x.shape[1]
        if padding_mask is None and next_positions is None:
            return (*self.rotary.cos_sin(position, T, torch.float32), None)
        real = padding_mask if padding_mask is not None else torch.ones(
            x.shape[0], T, dtype=torch.bool, device=x.device)
        start = next_positions if next_positions is not None else position
        positions, next_positions = row_positions(real.bool(), start)
        return (*rotary_at(self.rotary, positions, torch.float32), next_positions)

    def _rotated_feature_attention(
        self, phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor], memory: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature maps before rotary: phi_q, phi_k (B, T, H, F) and v (B, T, H, D) of the
        tokens at the rotation `cos_sin` ((B or 1, T, 1, F) float32 each), memory
        (B, H, F, D[+1]) -> o (B, T, H, D), final memory.

        The numerator reads (R_t phi(q_t)) . (R_s phi(k_s)), which depends on t - s only; the
        denominator reads the unrotated phi(q_t) . phi(k_s), which non-negative maps keep from
        cancelling. The two need different features, so they are two runs of the op, whose
        final states side by side are the (F, D + 1) memory the one-run normalised form keeps.
        """
        out_dtype, dtype = v.dtype, compute_dtype(v.dtype)
        # the op computes in this dtype anyway; its outputs in it keep the division exact
        phi_q, phi_k, v = phi_q.to(dtype), phi_k.to(dtype), v.to(dtype)
        cos, sin = (part.to(dtype) for part in cos_sin)
        run = dict(scale=self.feature_map.kernel_scale, output_final_state=True,
                   chunk_size=self.chunk_size)
        rotated_q, rotated_k = Rotary.apply(phi_q, cos, sin), Rotary.apply(phi_k, cos, sin)
        if not self.normalize:
            o, final = linear_attention(rotated_q, rotated_k, v, initial_state=memory, **run)
            return o.to(out_dtype), final
        D = self.head_dim
        numerator, values_memory = linear_attention(
            rotated_q, rotated_k, v,
            initial_state=None if memory is None else memory[..., :D].contiguous(), **run,
        )
        denominator, key_sum = linear_attention(
            phi_q, phi_k, torch.ones_like(v[..., :1]),
            initial_state=None if memory is None else memory[..., D:].contiguous(), **run,
        )
        o = numerator / (denominator + NORMALIZE_EPS)
        return o.to(out_dtype), torch.cat([values_memory, key_sum], dim=-1)
