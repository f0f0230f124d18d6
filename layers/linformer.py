"""Linformer: attention over k slots instead of T positions, in two forms.

- `LinformerSelfAttention`: the paper's bidirectional Linformer (Wang et al. 2020): keys and
  values are projected along the sequence, K' = E K and V' = F V with E, F of shape
  (k_slots, max_seq_len), and every query attends softmax-wise over the k projected slots. Each
  slot mixes every position, the future included, so it serves encoders and classification
  heads; it is a plain module, not a registered mixer.
- `linformer` (registered mixer, `causal: true`): the causal bounded-memory form in the spirit of
  ABC ("Attention with Bounded-memory Control", Peng et al. 2022). Each token writes itself into
  k memory slots through a control vector alpha_t = softmax over slots of s_proj(x_t); the slot
  keys and values are the control-weighted averages of the keys and values so far,

      K~_t[j] = sum_{i<=t} alpha_ij k_i / A_tj,   V~_t[j] = sum_{i<=t} alpha_ij v_i / A_tj,
      A_tj = sum_{i<=t} alpha_ij                  (the accumulated control),

  and the query reads them with softmax attention over the slots:
  o_t = softmax(q_t K~_t^T / sqrt(D)) V~_t. The state is the three running sums, k x (2D + 1)
  numbers per head whatever the length.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .base import Mixer, MixerState
from .linear import Linear
from .registry import register_mixer

# accumulated control is a sum of softmax outputs, positive unless every term underflowed; the
# floor only turns 0 / 0 (slot never written) into 0 instead of NaN
_CONTROL_FLOOR = 1e-30


def bounded_memory_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    control: torch.Tensor,
    scale: float,
    initial_state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
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
    initial_state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
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


@dataclasses.dataclass
class LinformerState(MixerState):
    """Running sums of the causal (bounded-memory) Linformer, float32 whatever the activations:
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
class CausalLinformer(Mixer):
    """Causal Linformer as bounded-memory control (see the module docstring).

    x: (B, T, d_model) -> (B, T, d_model). Training runs the chunked form (no loop over time),
    decoding (T = 1) updates the three sums and reads them. Gradients stop at a carried state.
    """

    state_class = LinformerState
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
        return LinformerState(
            torch.zeros(*shape, self.head_dim, device=device),
            torch.zeros(*shape, self.head_dim, device=device),
            torch.zeros(*shape, device=device),
        )

    def state_size(self, seq_len, dtype=torch.float32):
        # held in float32 whatever `dtype` the activations have (see init_state)
        return 4 * self.n_heads * self.k_slots * (2 * self.head_dim + 1)

    def forward(self, x, state=None):
        self.check_input(x, state)
        if state is None:
            state = self.init_state(x.shape[0], x.device)
        split = "b t (h d) -> b t h d"
        q = rearrange(self.q_proj(x), split, h=self.n_heads).float()
        k = rearrange(self.k_proj(x), split, h=self.n_heads).float()
        v = rearrange(self.v_proj(x), split, h=self.n_heads).float()
        control = rearrange(self.s_proj(x), split, h=self.n_heads).float().softmax(-1)
        carried = (state.keys, state.values, state.control)
        scale = self.head_dim ** -0.5
        if x.shape[1] == 1:
            o, sums = self._step(q, k, v, control, scale, carried)
        else:
            o, sums = bounded_memory_attention_chunked(
                q, k, v, control, scale, carried, self.chunk_size
            )
        y = self.o_proj(rearrange(o.to(x.dtype), "b t h d -> b t (h d)"))
        return y, LinformerState(*(s.detach() for s in sums))

    @staticmethod
    def _step(q, k, v, control, scale, carried):
        """The recurrent form for one token: write it into the slots, then read them."""
        key_sum, value_sum, control_sum = carried
        alpha = control[:, 0, :, :, None]  # (B, H, n, 1)
        key_sum = key_sum + alpha * k[:, 0, :, None, :]
        value_sum = value_sum + alpha * v[:, 0, :, None, :]
        control_sum = control_sum + control[:, 0]
        denominator = control_sum.clamp_min(_CONTROL_FLOOR)[..., None]
        scores = torch.einsum("bhd,bhnd->bhn", q[:, 0], key_sum / denominator) * scale
        o = torch.einsum("bhn,bhnd->bhd", scores.softmax(-1), value_sum / denominator)
        return o[:, None], (key_sum, value_sum, control_sum)


class LinformerSelfAttention(nn.Module):
    """The paper's bidirectional Linformer self-attention (Wang et al. 2020, eq. 7).

    x: (B, T, d_model) with T <= max_seq_len -> (B, T, d_model). Keys and values (B, T, H, D)
    are projected along the sequence by E, F (k_slots, max_seq_len), the first T columns for a
    shorter input, to (B, k_slots, H, D); each query attends over the k_slots projected positions.
    `share_kv` uses E for both (the paper's key-value sharing); `key_padding_mask` (B, T), True
    for real tokens, zeroes padded keys and values before the projection. Every output depends on
    every input position: not causal, no state.
    """

    def __init__(
        self,
        d_model: int,
        *,
        n_heads: int = 4,
        max_seq_len: int = 512,
        k_slots: int = 64,
        share_kv: bool = False,
        bias: bool = True,
    ):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(
                f"LinformerSelfAttention: d_model={d_model} is not divisible by "
                f"n_heads={n_heads}"
            )
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.max_seq_len, self.k_slots = max_seq_len, k_slots
        self.q_proj = Linear(d_model, d_model, bias=bias)
        self.k_proj = Linear(d_model, d_model, bias=bias)
        self.v_proj = Linear(d_model, d_model, bias=bias)
        self.o_proj = Linear(d_model, d_model, bias=bias)
        # std 1 / sqrt(n): a projected slot then has the scale of one key, whatever n is
        self.E = nn.Parameter(torch.randn(k_slots, max_seq_len) * max_seq_len ** -0.5)
        self.F = None if share_kv else nn.Parameter(
            torch.randn(k_slots, max_seq_len) * max_seq_len ** -0.5
        )

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"LinformerSelfAttention: x must be (B, T, d_model={self.d_model}), "
                f"got {tuple(x.shape)}"
            )
        seq_len = x.shape[1]
        if seq_len > self.max_seq_len:
            raise ValueError(
                f"LinformerSelfAttention: sequence length {seq_len} > "
                f"max_seq_len={self.max_seq_len}; "
                "E and F project a fixed number of positions"
            )
        split = "b t (h d) -> b t h d"
        q = rearrange(self.q_proj(x), split, h=self.n_heads)
        k = rearrange(self.k_proj(x), split, h=self.n_heads)
        v = rearrange(self.v_proj(x), split, h=self.n_heads)
        if key_padding_mask is not None:
            keep = key_padding_mask[:, :, None, None].to(k.dtype)
            k, v = k * keep, v * keep
        E = self.E[:, :seq_len]
        F_ = E if self.F is None else self.F[:, :seq_len]
        k_slots = torch.einsum("nt,bthd->bhnd", E, k)
        v_slots = torch.einsum("nt,bthd->bhnd", F_, v)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k_slots, v_slots)
        return self.o_proj(rearrange(out, "b h t d -> b t (h d)"))
