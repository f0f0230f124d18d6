"""The causal mixer registered as `linformer`: ABC-style bounded-memory attention (Peng et al.
2022, "ABC: Attention with Bounded-memory Control"), not the Linformer paper's layer.

Why it carries the `linformer` key: the survey this project reproduces lists Linformer among the
efficient architectures, and the paper's Linformer (`zoo.layers.linformer`) projects keys and
values along the whole sequence, the future included, so it cannot run causally or carry a
state. ABC's paper shows Linformer is bounded-memory control with fixed, position-indexed
control weights; with control weights computed from each token instead (softmax of s_proj(x_t)),
the same k-slot memory becomes causal, so this form stands in for Linformer in a causal model
and keeps the configs' and benchmarks' `type: linformer`. The op itself (reference, chunked and
one-token forms) is `zoo.layers.bounded_memory_attention`.
"""

from __future__ import annotations

import dataclasses

import torch
from einops import rearrange

from .base import Mixer, MixerState, fill_padding
from .bounded_memory_attention import (
    bounded_memory_attention_chunked,
    bounded_memory_attention_step,
)
from .linear import Linear
from .registry import register_mixer


@dataclasses.dataclass
class BoundedMemoryState(MixerState):
    """Running sums of bounded-memory attention, float32 whatever the activations:
    keys and values (B, H, n, D) weighted by the control, and the control sum (B, H, n)."""

    keys: torch.Tensor
    values: torch.Tensor
    control: torch.Tensor


_BIDIRECTIONAL_ERROR = (
    "linformer: causal=False asks for the paper's bidirectional Linformer, whose projections "
    "E, F (k_slots x max_seq_len) mix every position of the sequence, the future included, into "
    "each slot: no token's output exists before the whole sequence is seen and no state can be "
    "carried, so it cannot be a causal language-model mixer. Use "
    "zoo.layers.linformer.LinformerSelfAttention in an encoder or classification head, or "
    "causal: true (bounded-memory control, a k-slot state) in a causal model."
)


@register_mixer("linformer")
class BoundedMemoryAttention(Mixer):
    """ABC-style bounded-memory attention over k_slots slots per head, causal (see the module
    docstring for why it is the `linformer` mixer).

    x: (B, T, d_model) -> (B, T, d_model). Training runs the chunked form (no loop over time),
    decoding (T = 1) updates the three sums and reads them. Gradients stop at a carried state.
    """

    state_class = BoundedMemoryState
    bounded = True
    test_variants = [
        {"n_heads": 4, "k_slots": 8, "chunk_size": 8},
        {"n_heads": 2, "k_slots": 1, "qkv_bias": True},
    ]

    def __init__(
        self,
        d_model: int,
        layer_idx: int = 0,
        *,
        causal: bool = True,
        n_heads: int | None = None,
        k_slots: int = 32,
        chunk_size: int = 64,
        qkv_bias: bool = False,
    ):
        super().__init__(d_model, layer_idx)
        if not causal:
            raise ValueError(_BIDIRECTIONAL_ERROR)
        n_heads = n_heads or max(1, d_model // 64)
        if d_model % n_heads:
            raise ValueError(
                f"linformer: d_model={d_model} is not divisible by n_heads={n_heads}"
            )
        if k_slots < 1:
            raise ValueError(f"linformer: k_slots={k_slots} must be a positive number of slots")
        if chunk_size < 1:
            raise ValueError(f"linformer: chunk_size={chunk_size} must be positive")
        self.n_heads, self.head_dim, self.k_slots = n_heads, d_model // n_heads, k_slots
        self.chunk_size = chunk_size
        self.q_proj = Linear(d_model, d_model, bias=qkv_bias)
        self.k_proj = Linear(d_model, d_model, bias=qkv_bias)
        self.v_proj = Linear(d_model, d_model, bias=qkv_bias)
        self.s_proj = Linear(d_model, n_heads * k_slots, bias=False)  # the control logits
        self.o_proj = Linear(d_model, d_model, bias=False)

    def init_state(self, batch_size, device=None, dtype=None):
        # dtype is ignored on purpose: sums over long sequences are kept in float32
        device = device or self.q_proj.weight.device
        shape = (batch_size, self.n_heads, self.k_slots)
        return BoundedMemoryState(
            torch.zeros(*shape, self.head_dim, device=device),
            torch.zeros(*shape, self.head_dim, device=device),
            torch.zeros(*shape, device=device),
        )

    def state_size(self, seq_len, dtype=torch.float32):
        # held in float32 whatever `dtype` the activations have (see init_state)
        return 4 * self.n_heads * self.k_slots * (2 * self.head_dim + 1)

    def forward(self, x, state=None, padding_mask=None):
        self.check_input(x, state, padding_mask)
        if state is None:
            state = self.init_state(x.shape[0], x.device)
        split = "b t (h d) -> b t h d"
        q = rearrange(self.q_proj(x), split, h=self.n_heads).float()
        k = rearrange(self.k_proj(x), split, h=self.n_heads).float()
        v = rearrange(self.v_proj(x), split, h=self.n_heads).float()
        control = rearrange(self.s_proj(x), split, h=self.n_heads).float().softmax(-1)
        # a padded token writes nothing into the slots: every sum stays as it was
        control = fill_padding(control, padding_mask)
        carried = (state.keys, state.values, state.control)
        scale = self.head_dim ** -0.5
        if x.shape[1] == 1:
            o, sums = bounded_memory_attention_step(q, k, v, control, scale, carried)
        else:
            o, sums = bounded_memory_attention_chunked(
                q, k, v, control, scale, carried, self.chunk_size
            )
        y = self.o_proj(rearrange(o.to(x.dtype), "b t h d -> b t (h d)"))
        return fill_padding(y, padding_mask), BoundedMemoryState(*(s.detach() for s in sums))
