"""Multi-scale retention, RetNet's mixer (Sun et al. 2023, "Retentive Network").

Per head h, with gamma_h = 1 - 2^(-5-h) (section 2.2, a different time scale per head) and
relative position given to q and k by a rotation,

    parallel:   O = (Q K^T * D) V,            D_nm = gamma^(n-m) if n >= m else 0   (eq. 5)
    recurrent:  S_n = gamma S_{n-1} + k_n v_n^T,  o_n = q_n S_n                      (eq. 6)
    chunked:    parallel within chunks, recurrent across them                        (eq. 7)

then GroupNorm per head, a swish gate and the output projection (eq. 8):
MSR(X) = (swish(X W_G) * GroupNorm(heads)) W_O. All three forms run through
`zoo.kernels.linear_attention` with decay = log gamma per head: the op's chunked path for
training, its one-step recurrence for T = 1, and a single chunk (chunk_size >= T) is the
parallel form; `parallel_retention` writes eq. 5 out as a T x T matrix for testing.

Relative position: rotary embeddings from `layers/rotary.py` (Llama's rotate-half layout and
frequencies). The paper's xPos rotates q and k by the same angles n * theta (torchscale pairs
adjacent channels, a permutation of ours); its extra per-channel xPos scaling is left out, as
torchscale's own RetNet leaves it out: gamma already decays distant positions.
The paper's retention-score normalisations (section 2.2) rescale each head's output per token,
which the following GroupNorm undoes, so they are omitted; the three forms stay exactly equal.
Values have value_factor * d_model channels (2 in the paper), keys d_model.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from zoo.kernels import compute_dtype
from zoo.kernels.linear_attention import linear_attention

from .attention import rotary_at, row_positions
from .base import Mixer, MixerState, fill_padding
from .linear import Linear
from .registry import register_mixer
from .rotary import Rotary


def retention_log_gammas(n_heads: int) -> torch.Tensor:
    """log(1 - 2^(-5-h)) for h = 0 .. n_heads - 1, (H,), computed with log1p in float64 so the
    slowest heads (gamma within 2^-20 of 1) keep their precision."""
    exponents = -5.0 - torch.arange(n_heads, dtype=torch.float64)
    return torch.log1p(-torch.pow(2.0, exponents))


def parallel_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gamma: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The parallel form (eq. 5) with an explicit decay-masked (T, T) matrix per head.

    Args:
        q, k: (B, T, H, K); v: (B, T, H, V); log_gamma: (H,); scale multiplies q.
        initial_state: (B, H, K, V), the state before the first token (reaches token n
            decayed by gamma^(n+1)).
    Returns:
        o (B, T, H, V) and the state after the last token (B, H, K, V).
    """
    T = q.shape[1]
    positions = torch.arange(T, device=q.device, dtype=q.dtype)
    offsets = positions[:, None] - positions[None, :]  # n - m
    log_gamma = log_gamma.to(q.dtype)
    decay = torch.exp(offsets[None] * log_gamma[:, None, None])  # (H, T, T)
    decay = decay.masked_fill(offsets[None] < 0, 0.0)
    scores = torch.einsum("bnhk,bmhk->bhnm", q * scale, k) * decay
    o = torch.einsum("bhnm,bmhv->bnhv", scores, v)
    # weight of token m in the final state: gamma^(T-1-m)
    to_end = torch.exp((T - 1 - positions)[:, None] * log_gamma[None, :])  # (T, H)
    final_state = torch.einsum("bmhk,mh,bmhv->bhkv", k, to_end, v)
    if initial_state is not None:
        initial_state = initial_state.to(q.dtype)
        from_start = torch.exp((positions + 1)[:, None] * log_gamma[None, :])  # (T, H)
        o = o + torch.einsum("bnhk,nh,bhkv->bnhv", q * scale, from_start, initial_state)
        final_state = final_state + torch.exp(T * log_gamma)[None, :, None, None] * initial_state
    return o, final_state


@dataclasses.dataclass
class RetNetState(MixerState):
    """S per head, (B, H, K, V) in float32 (float64 for float64 activations), and the absolute
    position of the next token (for the rotation). After padding with a rotation,
    next_positions (B,) long: each row's next position (its real tokens counted)."""

    memory: torch.Tensor
    position: int = 0
    next_positions: torch.Tensor | None = None


@register_mixer("retnet")
class MultiScaleRetention(Mixer):
    """RetNet's multi-scale retention. x: (B, T, d_model) -> (B, T, d_model).

    q, k: (B, T, H, K = d_model / H); v, gate: (B, T, H, V = value_factor * d_model / H).
    Options: n_heads, value_factor, rope_theta (None: no rotation), norm_eps, chunk_size.
    """

    state_class = RetNetState
    bounded = True
    test_variants = [
        {"n_heads": 4},
        {"n_heads": 2, "value_factor": 1, "rope_theta": None, "chunk_size": 8},
        {"n_heads": 8, "chunk_size": 16},
    ]

    def __init__(
        self,
        d_model: int,
        layer_idx: int = 0,
        *,
        n_heads: int | None = None,
        value_factor: int = 2,
        rope_theta: float | None = 10000.0,
        norm_eps: float = 1e-5,
        chunk_size: int = 64,
    ):
        super().__init__(d_model, layer_idx)
        n_heads = n_heads or max(1, d_model // 64)
        if d_model % n_heads:
            raise ValueError(f"retnet: d_model={d_model} is not divisible by n_heads={n_heads}")
        if value_factor < 1:
            raise ValueError(f"retnet: value_factor={value_factor} must be a positive integer")
        self.n_heads, self.key_dim = n_heads, d_model // n_heads
        self.value_dim = value_factor * d_model // n_heads
        self.norm_eps, self.chunk_size = norm_eps, chunk_size
        self.q_proj = Linear(d_model, d_model, bias=False)
        self.k_proj = Linear(d_model, d_model, bias=False)
        self.v_proj = Linear(d_model, n_heads * self.value_dim, bias=False)
        self.g_proj = Linear(d_model, n_heads * self.value_dim, bias=False)
        self.o_proj = Linear(n_heads * self.value_dim, d_model, bias=False)
        self.group_norm = nn.GroupNorm(n_heads, n_heads * self.value_dim, eps=norm_eps)
        self.rotary = Rotary(self.key_dim, rope_theta) if rope_theta is not None else None
        # a fixed function of n_heads, so not saved with the weights
        self.register_buffer(
            "log_gamma", retention_log_gammas(n_heads).float(), persistent=False
        )

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the gammas (from_pretrained materialises non-persistent buffers empty)."""
        fresh = retention_log_gammas(self.n_heads)
        self.log_gamma.copy_(fresh.to(self.log_gamma.device, self.log_gamma.dtype))

    def init_state(self, batch_size, device=None, dtype=None):
        device = device or self.q_proj.weight.device
        shape = (batch_size, self.n_heads, self.key_dim, self.value_dim)
        return RetNetState(torch.zeros(shape, device=device, dtype=compute_dtype(dtype)))

    def state_size(self, seq_len, dtype=torch.float32):
        element = compute_dtype(dtype).itemsize  # the op's float32 / float64 state
        return element * self.n_heads * self.key_dim * self.value_dim

    def forward(self, x, state=None, padding_mask=None):
        self.check_input(x, state, padding_mask)
        B, T, _ = x.shape
        position = 0 if state is None else state.position
        next_positions = None if state is None else state.next_positions
        q = rearrange(self.q_proj(x), "b t (h k) -> b t h k", k=self.key_dim)
        k = rearrange(self.k_proj(x), "b t (h k) -> b t h k", k=self.key_dim)
        v = rearrange(self.v_proj(x), "b t (h v) -> b t h v", v=self.value_dim)
        if self.rotary is not None and (padding_mask is not None or next_positions is not None):
            # each row rotates at its own real tokens' positions, as it would alone
            real = padding_mask.bool() if padding_mask is not None else torch.ones(
                B, T, dtype=torch.bool, device=x.device)
            start = next_positions if next_positions is not None else position
            positions, next_positions = row_positions(real, start)
            cos, sin = rotary_at(self.rotary, positions, q.dtype)
            q, k = Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)
        elif self.rotary is not None:
            cos, sin = self.rotary.cos_sin(position, T, q.dtype)
            q, k = Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)
        decay = self.log_gamma.to(q.dtype)
        if padding_mask is not None:
            # a padded token neither decays the state (log-decay 0) nor adds to it
            decay = fill_padding(decay.expand(B, T, -1), padding_mask)
            k = fill_padding(k, padding_mask)
        o, memory = linear_attention(
            q, k, v, decay=decay, scale=self.key_dim ** -0.5,
            initial_state=None if state is None else state.memory,
            output_final_state=True, chunk_size=self.chunk_size,
        )
        # GroupNorm with one group per head = LayerNorm over each head's V channels
        o = self.group_norm(rearrange(o, "b t h v -> (b t) (h v)"))
        o = rearrange(o, "(b t) c -> b t c", b=B) * F.silu(self.g_proj(x))
        # gradients stop at the carried state (the contract allows it; decoding needs no graph)
        y = fill_padding(self.o_proj(o), padding_mask)
        return y, RetNetState(memory.detach(), position + T, next_positions)
