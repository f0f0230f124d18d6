"""Sliding-window softmax attention plus linear attention over everything before the window,
in one normalisation: the LoLCATs mixer (Zhang et al. 2024) for linearising a pretrained
attention model while keeping its quality.

Each query sees its last `window` tokens exactly (softmax scores, rotary positions as the
teacher computed them) and every older token through learned feature maps (Hedgehog by
default), weighted by a learned per-head factor r = exp(log_linear_scale). LoLCATs' sigmoid
window factor w, with 1 - w on the linear part, is the same thing with r = (1 - w) / w.
Projections are named q_proj, k_proj, v_proj, o_proj as in `attention.py`, so a softmax
attention layer's weights copy over by name. The state is bounded: the last W tokens' keys,
values and key features, and the linear memory of the older ones.
"""

from __future__ import annotations

import dataclasses

import torch
from einops import rearrange
from torch import nn

from zoo.kernels import compute_dtype
from zoo.kernels.window_linear_attention import (
    WindowLinearAttentionState,
    window_linear_attention,
    window_linear_attention_weights,
)

from .attention import rotary_at, row_positions
from .base import Mixer, MixerState, fill_padding
from .feature_maps import build_feature_map
from .linear import Linear
from .registry import register_mixer
from .rotary import Rotary


@dataclasses.dataclass
class WindowLinearAttentionMixerState(MixerState):
    """Per KV head (the query heads of a group share it):

    k: (B, W, H_kv, D) the last W keys (after rotary), oldest first; v: (B, W, H_kv, D) their
    values; phi_k: (B, W, H_kv, F) their key features — all in the activations' dtype, the
    first W - min(position, W) slots empty (zero).
    S: (B, H_kv, F, D), z: (B, H_kv, F): sums of phi_k v^T and phi_k over the tokens older than
    the window, float32 (float64 for float64 activations).
    position: tokens seen so far (the next token's rotary position).
    next_positions: (B,) long after padding, each row's real tokens seen (its next position;
    its window's empty slots are the first W - min(next_positions, W)), else None.
    """

    k: torch.Tensor
    v: torch.Tensor
    phi_k: torch.Tensor
    S: torch.Tensor
    z: torch.Tensor
    position: int = 0
    next_positions: torch.Tensor | None = None


@register_mixer("window_linear_attention")
class WindowLinearAttention(Mixer):
    """Softmax over the last `window` tokens + linear attention before it (LoLCATs).

    x: (B, T, d_model) -> (B, T, d_model). Options: n_heads / n_kv_heads (grouped KV),
    rope_theta (None: no rotary), `window` (W >= 1), `feature_map` (a name of
    feature_maps.FEATURE_MAPS other than "identity", built as LinearAttention builds it;
    `feature_dim` for favor+), `feature_maps_after_rotary` (True: the feature maps see the
    rotary-embedded q and k the teacher's softmax saw; False: q and k before rotary),
    `qkv_bias`, `chunk_size`. Training runs the op's chunked form, decoding (T = 1) its
    recurrent step.
    """

    state_class = WindowLinearAttentionMixerState
    bounded = True
    test_variants = [
        {"n_heads": 4, "n_kv_heads": 2, "window": 5, "feature_map": "elu+1"},
        {"n_heads": 2, "window": 64, "chunk_size": 16},
        {"n_heads": 4, "n_kv_heads": 1, "window": 3, "feature_maps_after_rotary": False,
         "qkv_bias": True},
        {"n_heads": 2, "window": 1, "feature_map": "favor+", "feature_dim": 24,
         "rope_theta": None},
    ]

    def __init__(
        self,
        d_model: int,
        layer_idx: int = 0,
        *,
        n_heads: int | None = None,
        n_kv_heads: int | None = None,
        rope_theta: float | None = 10000.0,
        window: int = 64,
        feature_map: str = "hedgehog",
        feature_dim: int | None = None,
        feature_maps_after_rotary: bool = True,
        qkv_bias: bool = False,
        chunk_size: int = 64,
    ):
        super().__init__(d_model, layer_idx)
        name = "window_linear_attention"
        n_heads = n_heads or max(1, d_model // 64)
        n_kv_heads = n_kv_heads or n_heads
        if d_model % n_heads:
            raise ValueError(f"{name}: d_model={d_model} is not divisible by n_heads={n_heads}")
        if n_heads % n_kv_heads:
            raise ValueError(
                f"{name}: n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}"
            )
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"{name}: window={window!r} must be an int >= 1 (tokens the "
                             "softmax part sees, the query's own included)")
        if feature_map == "identity":
            raise ValueError(
                f"{name}: feature_map='identity' gives signed features, so phi(q) . sum "
                "phi(k) can cancel the softmax part's denominator; use a non-negative map "
                "('elu+1', 'relu', 'favor+', 'hedgehog')"
            )
        head_dim = d_model // n_heads
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.window, self.chunk_size = window, chunk_size
        self.feature_maps_after_rotary = feature_maps_after_rotary
        self.q_proj = Linear(d_model, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = Linear(n_heads * head_dim, d_model, bias=False)
        self.rotary = Rotary(head_dim, rope_theta) if rope_theta is not None else None
        self.feature_map = build_feature_map(
            feature_map, head_dim, n_heads, n_kv_heads, feature_dim=feature_dim
        )
        # r = exp(0) = 1 at the start: the older tokens weigh as much as LoLCATs' w = 1/2 gives
        self.log_linear_scale = nn.Parameter(torch.zeros(n_heads))

    @property
    def groups(self) -> int:
        return self.n_heads // self.n_kv_heads

    def init_state(self, batch_size, device=None, dtype=None):
        device = device or self.q_proj.weight.device
        dtype = dtype or self.q_proj.weight.dtype
        memory_dtype = compute_dtype(dtype)
        B, W, H, D, F = (batch_size, self.window, self.n_kv_heads, self.head_dim,
                         self.feature_map.feature_dim)
        window_zeros = lambda dim: torch.zeros(B, W, H, dim, device=device, dtype=dtype)
        return WindowLinearAttentionMixerState(
            k=window_zeros(D), v=window_zeros(D), phi_k=window_zeros(F),
            S=torch.zeros(B, H, F, D, device=device, dtype=memory_dtype),
            z=torch.zeros(B, H, F, device=device, dtype=memory_dtype),
        )

    def state_size(self, seq_len, dtype=torch.float32):
        element = torch.empty((), dtype=dtype).element_size()
        memory_element = 8 if dtype == torch.float64 else 4
        H, D, F = self.n_kv_heads, self.head_dim, self.feature_map.feature_dim
        return self.window * H * (2 * D + F) * element + H * F * (D + 1) * memory_element

    def _project(self, x: torch.Tensor, position: int, positions: torch.Tensor | None = None):
        """x (B, T, d_model) at `position` (or at per-row `positions` (B, T), a padded batch's)
        -> q, k (rotated), v, phi_q, phi_k (B, T, H·, ·) and r (H,)."""
        T = x.shape[1]
        split = "b t (h d) -> b t h d"
        q = rearrange(self.q_proj(x), split, d=self.head_dim)
        k = rearrange(self.k_proj(x), split, d=self.head_dim)
        v = rearrange(self.v_proj(x), split, d=self.head_dim)
        q_rot, k_rot = q, k
        if self.rotary is not None:
            cos, sin = (self.rotary.cos_sin(position, T, q.dtype) if positions is None
                        else rotary_at(self.rotary, positions, q.dtype))
            q_rot, k_rot = Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)
        mapped_q, mapped_k = (q_rot, k_rot) if self.feature_maps_after_rotary else (q, k)
        phi_q = self.feature_map(mapped_q, "query")
        phi_k = self.feature_map(mapped_k, "key")
        # the feature map's kernel_scale multiplies phi_q . phi_k: it folds into r
        linear_scale = self.log_linear_scale.exp() * self.feature_map.kernel_scale
        return q_rot, k_rot, v, phi_q, phi_k, linear_scale

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, d_model) from a fresh start -> (B, n_heads, T, T): the weight each query
        gives each key (rows sum to 1), for attention transfer's cross-entropy."""
        q, k, _, phi_q, phi_k, linear_scale = self._project(x, 0)
        return window_linear_attention_weights(
            q, self._repeat(k, 2), phi_q, self._repeat(phi_k, 2), self.window,
            linear_scale=linear_scale, scale=self.head_dim ** -0.5)

    def forward(self, x, state=None, padding_mask=None):
        self.check_input(x, state, padding_mask)
        if padding_mask is not None or (state is not None and state.next_positions is not None):
            return self._forward_padded(x, state, padding_mask)
        T = x.shape[1]
        position = 0 if state is None else state.position
        q_rot, k_rot, v, phi_q, phi_k, linear_scale = self._project(x, position)
        if T == 1 and state is not None:
            return self._decode_step(q_rot, k_rot, v, phi_q, phi_k, linear_scale, state)
        o, final = window_linear_attention(
            q_rot, self._repeat(k_rot, 2), self._repeat(v, 2), phi_q, self._repeat(phi_k, 2),
            window=self.window, linear_scale=linear_scale, scale=self.head_dim ** -0.5,
            initial_state=self._op_state(state), output_final_state=True,
            chunk_size=self.chunk_size,
        )
        if self.window >= T and torch.is_grad_enabled() and phi_k.requires_grad:
            # no token of x leaves the window, so the key map's true gradient is zero; a zero
            # term makes it an explicit zero, not None, which DDP would flag as unused
            o = o + 0.0 * phi_k.sum()
        y = self.o_proj(rearrange(o, "b t h d -> b t (h d)"))
        return y, self._mixer_state(final, position + T)

    def _forward_padded(self, x: torch.Tensor, state: WindowLinearAttentionMixerState | None,
                        padding_mask: torch.Tensor | None):
        """The padding contract (layers/base.py), token by token: each row's window holds its
        last W real tokens and its rotation counts only them, so every row gets what it gets
        alone. (A loop over time: the op's chunked form windows by slots, not per row.)"""
        B, T, _ = x.shape
        if state is None:
            state = self.init_state(B, x.device, x.dtype)
        if state.next_positions is None:
            state = dataclasses.replace(state, next_positions=torch.full(
                (B,), state.position, dtype=torch.long, device=x.device))
        real = (padding_mask.bool() if padding_mask is not None
                else torch.ones(B, T, dtype=torch.bool, device=x.device))
        positions, _ = row_positions(real, state.next_positions)
        q, k, v, phi_q, phi_k, linear_scale = self._project(x, 0, positions)
        outputs = []
        for t in range(T):
            now = slice(t, t + 1)
            y, state = self._decode_step(q[:, now], k[:, now], v[:, now], phi_q[:, now],
                                         phi_k[:, now], linear_scale, state, real[:, t])
            outputs.append(y)
        return torch.cat(outputs, dim=1), state

    def _decode_step(self, q, k, v, phi_q, phi_k, linear_scale,
                     state: WindowLinearAttentionMixerState, real: torch.Tensor | None = None):
        """One token against the state as it is stored, one copy per KV head: the query heads
        of a group read their KV head's window and memory in place (no per-query-head copies
        of the state, as the op's general path makes), and the shifted window is at once this
        step's context and the next state. The op's recurrent step, term for term.

        q (B, 1, H, D), k, v (B, 1, H_kv, D), phi_q (B, 1, H, F), phi_k (B, 1, H_kv, F). A state
        that has seen padding counts each row's tokens apart (next_positions), and real (B,)
        False leaves a row's state as it was (its output zero)."""
        B, W, G = q.shape[0], self.window, self.groups
        Hk, D = self.n_kv_heads, self.head_dim
        dtype = compute_dtype(q.dtype)
        window_dtype = state.k.dtype
        # the token entering the window; the oldest slot leaves it for the linear memory
        keys = torch.cat([state.k[:, 1:], k.to(window_dtype)], dim=1)  # (B, W, H_kv, D)
        values = torch.cat([state.v[:, 1:], v.to(window_dtype)], dim=1)
        features = torch.cat([state.phi_k[:, 1:], phi_k.to(window_dtype)], dim=1)
        S, z = state.S, state.z
        rows = state.next_positions
        if rows is not None:  # each row's own count: where a token left, and empty slots
            leaving_f, leaving_v = state.phi_k[:, 0].to(dtype), state.v[:, 0].to(dtype)
            left = (rows >= W)[:, None, None]
            S = torch.where(left[..., None], S + torch.einsum(
                "bkf,bkd->bkfd", leaving_f, leaving_v), S)
            z = torch.where(left, z + leaving_f, z)
        elif state.position >= W:  # a token left: slot 0 of the old window
            leaving_f, leaving_v = state.phi_k[:, 0].to(dtype), state.v[:, 0].to(dtype)
            S = S + torch.einsum("bkf,bkd->bkfd", leaving_f, leaving_v)
            z = z + leaving_f
        q_g = q.to(dtype).view(B, Hk, G, D)  # query head h reads KV head h // G
        scores = torch.einsum("bkgd,bwkd->bkgw", q_g, keys.to(dtype)) * D ** -0.5
        if rows is not None:
            empty = W - (rows + 1).clamp(max=W)  # (B,) slots holding no token of the row yet
            slots = torch.arange(W, device=scores.device)
            scores = scores.masked_fill((slots < empty[:, None])[:, None, None, :], -torch.inf)
        else:
            filled = min(state.position + 1, W)
            if filled < W:  # the first W - filled slots hold no token yet
                scores[..., : W - filled] = -torch.inf
        p = torch.exp(scores - scores.amax(-1, keepdim=True).detach())
        A = torch.einsum("bkgw,bwkd->bkgd", p, values.to(dtype))
        phi_q_g = phi_q.to(dtype).view(B, Hk, G, -1)
        r = linear_scale.to(dtype).view(Hk, G)
        numerator = A + r[..., None] * torch.einsum("bkgf,bkfd->bkgd", phi_q_g, S)
        denominator = p.sum(-1) + r * torch.einsum("bkgf,bkf->bkg", phi_q_g, z)
        o = (numerator / denominator[..., None]).to(q.dtype).reshape(B, 1, Hk * G * D)
        new_state = WindowLinearAttentionMixerState(
            k=keys.detach(), v=values.detach(), phi_k=features.detach(), S=S.detach(),
            z=z.detach(), position=state.position + 1,
            next_positions=None if rows is None else rows + 1)
        if real is None:
            return self.o_proj(o), new_state
        # a padded token: the row's state stays exactly as it was
        kept = {name: torch.where(real.view(-1, *[1] * (old.dim() - 1)), new, old)
                for name, new, old in (
                    (f.name, getattr(new_state, f.name), getattr(state, f.name))
                    for f in dataclasses.fields(state))
                if isinstance(new, torch.Tensor)}
        kept["next_positions"] = rows + real.long()
        new_state = dataclasses.replace(new_state, **kept)
        return fill_padding(self.o_proj(o), real[:, None]), new_state

    def _repeat(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """KV heads out to query heads: query head h reads KV head h // groups."""
        return x if self.groups == 1 else x.repeat_interleave(self.groups, dim=dim)

    def _op_state(self, state: WindowLinearAttentionMixerState | None):
        if state is None:
            return None
        return WindowLinearAttentionState(
            k=self._repeat(state.k, 2), v=self._repeat(state.v, 2),
            phi_k=self._repeat(state.phi_k, 2), S=self._repeat(state.S, 1),
            z=self._repeat(state.z, 1), filled=min(state.position, self.window),
        )

    def _mixer_state(self, final: WindowLinearAttentionState,
                     position: int) -> WindowLinearAttentionMixerState:
        """Every query head of a group holds the same window and memory: one copy per KV head.
        Gradients stop at the carried state (the contract allows it; decoding needs no graph)."""
        return WindowLinearAttentionMixerState(
            k=self._per_kv_head(final.k, 2), v=self._per_kv_head(final.v, 2),
            phi_k=self._per_kv_head(final.phi_k, 2), S=self._per_kv_head(final.S, 1),
            z=self._per_kv_head(final.z, 1), position=position,
        )

    def _per_kv_head(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The first query head of each group, as a copy (a view would hold every head)."""
        if self.groups > 1:
            x = x.unflatten(dim, (self.n_kv_heads, self.groups)).select(dim + 1, 0)
            x = x.clone(memory_format=torch.contiguous_format)
        return x.detach()
