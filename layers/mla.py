"""Multi-head latent attention (MLA; DeepSeek-V2, 2024), as Kimi Linear's full-attention layers
compute it (transformers' KimiLinearAttention):

    q = q_proj x                    or q_b_proj(rms_norm(q_a_proj x))     (B, T, H, N + R)
    c, k_r = split(kv_a_proj_with_mqa x, [C, R]);  c = rms_norm(c)        one latent per token
    k_n, v = split(kv_b_proj c, [N, V]) per head                          (B, T, H, N), (.., V)
    y = o_proj(softmax([k_n | k_r] . q / sqrt(N + R)) v)

with C = kv_lora_rank, N = qk_nope_head_dim, R = qk_rope_head_dim, V = v_head_dim. Kimi Linear
uses no positional encoding at all (NoPE: its KDA layers carry position): the R "rope" channels
of the key are a part shared by every head and are never rotated, so zoo does not rotate them
either. Parameter names are transformers', so its tensors map by name.

The cache holds what MLA exists to make small: per token the normalised latent c and k_r,
C + R numbers, where softmax attention holds 2 * H * head_dim (Kimi Linear: 576 against
2 * 32 * 128 = 8192). A prefill expands the cached latents through kv_b_proj into per-head keys
and values (cheaper than the alternative when many queries share them). A decoding step instead
absorbs kv_b_proj into the query and the output (DeepSeek-V2, section 2.1.3): with W_k, W_v the
key and value rows of kv_b_proj for one head, q_n . (W_k c) = (W_k^T q_n) . c and
sum_j p_j W_v c_j = W_v (sum_j p_j c_j), so one query reads the C + R cached numbers of each
token once and never forms a per-head key or value.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from einops import rearrange

from zoo.kernels import compute_dtype

from .base import Mixer, MixerState, fill_padding
from .linear import Linear
from .norms import RMSNorm
from .registry import register_mixer

# transformers builds Kimi Linear's q_a_layernorm and kv_a_layernorm without config.rms_norm_eps
LATENT_NORM_EPS = 1e-6


@dataclasses.dataclass
class MLAState(MixerState):
    """The latent cache: `latent` (B, capacity, C + R) holds per token the normalised latent c
    and the shared key part k_r, `length` slots filled. Appending writes past `length` in place
    and returns a new state sharing the buffer (as `AttentionState` does), so decoding does not
    copy the cache each token; an older state object stays valid until a second branch appends
    from it. A cache that has seen padding also keeps `real` (B, capacity) bool, True at the
    slots of real tokens (MLA has no positions, so which slots to attend is all it needs);
    None for a cache that never saw padding."""

    latent: torch.Tensor
    length: int = 0
    real: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return self.latent.shape[1]

    def nbytes(self) -> int:
        return self.length * self.latent.shape[2] * self.latent.element_size()

    def filled(self) -> torch.Tensor:
        """(B, length, C + R): a view of the cached tokens."""
        return self.latent[:, : self.length]

    def write(self, latent: torch.Tensor, real: torch.Tensor | None = None) -> MLAState:
        """latent (B, T, C + R) into the T slots after `length`, which must be free; a padded
        cache takes the tokens' padding mask (B, T) too."""
        start, end = self.length, self.length + latent.shape[1]
        if end > self.capacity:
            raise ValueError(f"mla cache: {end} tokens do not fit {self.capacity} slots")
        self.latent[:, start:end] = latent
        if self.real is not None:
            self.real[:, start:end] = real
        return MLAState(self.latent, end, self.real)

    def with_capacity(self, capacity: int) -> MLAState:
        """The same cache in a new buffer of `capacity` slots (>= length)."""
        B, _, width = self.latent.shape
        latent = self.latent.new_empty(B, capacity, width)
        latent[:, : self.length] = self.filled()
        real = None
        if self.real is not None:
            real = self.real.new_zeros(B, capacity)
            real[:, : self.length] = self.real[:, : self.length]
        return MLAState(latent, self.length, real)

    def with_real_slots(self) -> MLAState:
        """This cache (sharing its buffer) with `real`, as a padded cache keeps it."""
        if self.real is not None:
            return self
        slots = torch.arange(self.capacity, device=self.latent.device)
        real = (slots < self.length).expand(self.latent.shape[0], -1).contiguous()
        return MLAState(self.latent, self.length, real)

    def reserve(self, tokens: int) -> MLAState:
        """Room for `tokens` more without growing, so a compiled decode step never sees the
        buffer change shape."""
        if self.length + tokens <= self.capacity:
            return self
        return self.with_capacity(self.length + tokens)


@register_mixer("mla")
class MultiHeadLatentAttention(Mixer):
    """Kimi Linear's MLA (the module docstring). x: (B, T, d_model) -> (B, T, d_model); state:
    the latent cache.

    Options (defaults: DeepSeek-V2's and Kimi Linear's ratios, N = V = head_dim = d_model /
    n_heads, R = head_dim / 2, C = 4 * head_dim): n_heads, q_lora_rank (None: a full-rank
    q_proj), kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim (0 allowed: no shared key part),
    v_head_dim, attention_bias (on q_a_proj, kv_a_proj_with_mqa and o_proj, as transformers
    puts it), norm_eps (of the two latent norms).
    """

    state_class = MLAState
    bounded = False
    test_variants = [
        {"n_heads": 4, "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
         "v_head_dim": 8},
        {"n_heads": 2, "q_lora_rank": 24, "kv_lora_rank": 12, "qk_rope_head_dim": 0,
         "attention_bias": True},
    ]

    def __init__(
        self,
        d_model: int,
        layer_idx: int = 0,
        *,
        n_heads: int | None = None,
        q_lora_rank: int | None = None,
        kv_lora_rank: int | None = None,
        qk_nope_head_dim: int | None = None,
        qk_rope_head_dim: int | None = None,
        v_head_dim: int | None = None,
        attention_bias: bool = False,
        norm_eps: float = LATENT_NORM_EPS,
    ):
        super().__init__(d_model, layer_idx)
        n_heads = n_heads or max(1, d_model // 64)
        head_dim = d_model // n_heads
        if head_dim == 0 and None in (qk_nope_head_dim, v_head_dim, kv_lora_rank):
            raise ValueError(
                f"mla: n_heads={n_heads} > d_model={d_model} leaves no default head size; "
                "set qk_nope_head_dim, v_head_dim and kv_lora_rank"
            )
        self.n_heads = n_heads
        self.qk_nope_head_dim = qk_nope_head_dim or head_dim
        self.qk_rope_head_dim = head_dim // 2 if qk_rope_head_dim is None else qk_rope_head_dim
        self.v_head_dim = v_head_dim or head_dim
        self.kv_lora_rank = kv_lora_rank or 4 * head_dim
        self.q_lora_rank = q_lora_rank
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.scale = self.qk_head_dim**-0.5
        query_width = n_heads * self.qk_head_dim
        if q_lora_rank is None:
            self.q_proj = Linear(d_model, query_width, bias=False)
        else:
            self.q_a_proj = Linear(d_model, q_lora_rank, bias=attention_bias)
            self.q_a_layernorm = RMSNorm(q_lora_rank, norm_eps)
            self.q_b_proj = Linear(q_lora_rank, query_width, bias=False)
        self.kv_a_proj_with_mqa = Linear(
            d_model, self.kv_lora_rank + self.qk_rope_head_dim, bias=attention_bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, norm_eps)
        self.kv_b_proj = Linear(
            self.kv_lora_rank, n_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = Linear(n_heads * self.v_head_dim, d_model, bias=attention_bias)

    @property
    def latent_width(self) -> int:
        """Numbers cached per token: the latent and the shared key part, C + R."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def init_state(self, batch_size, device=None, dtype=None, capacity: int = 0):
        weight = self.kv_a_proj_with_mqa.weight
        return MLAState(torch.empty(batch_size, capacity, self.latent_width,
                                    device=device or weight.device, dtype=dtype or weight.dtype))

    def state_size(self, seq_len, dtype=torch.float32):
        return seq_len * self.latent_width * torch.empty((), dtype=dtype).element_size()

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, d_model) -> (B, T, H, N + R)."""
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return rearrange(q, "b t (h d) -> b t h d", d=self.qk_head_dim)

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, d_model) -> what the cache holds per token: [rms_norm(c) | k_r], (B, T,
        C + R)."""
        c, k_rope = self.kv_a_proj_with_mqa(x).split(
            [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return torch.cat([self.kv_a_layernorm(c), k_rope], dim=-1)

    def expand(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached latents (B, L, C + R) -> keys (B, H, L, N + R) and values (B, H, L, V)."""
        c, k_rope = latent.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = rearrange(self.kv_b_proj(c), "b l (h d) -> b h l d", h=self.n_heads)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k_rope = k_rope[:, None].expand(-1, self.n_heads, -1, -1)
        return torch.cat([k_nope, k_rope], dim=-1), v

    def _append(self, state: MLAState, latent: torch.Tensor,
                real: torch.Tensor | None = None) -> MLAState:
        """Write latent (B, T, C + R) after the cached tokens, growing the buffer by doubling."""
        if state.length + latent.shape[1] > state.capacity:
            state = state.with_capacity(
                max(state.length + latent.shape[1], 2 * state.capacity, 16))
        return state.write(latent, real)

    def forward(self, x, state=None, padding_mask=None):
        self.check_input(x, state, padding_mask)
        B, T, _ = x.shape
        if state is None:
            state = self.init_state(B, x.device, x.dtype)
        real = None
        if padding_mask is not None or state.real is not None:
            # the padding contract (layers/base.py): padded slots are never attended
            state = state.with_real_slots()
            real = (padding_mask.bool() if padding_mask is not None
                    else torch.ones(B, T, dtype=torch.bool, device=x.device))
        q = self.query(x)
        latent = self.latent(x)
        # the cache never joins the autograd graph; gradients stop at the carried state
        new_state = self._append(state, latent.detach(), real)
        past = new_state.length - T
        if T == 1 and past > 0 and not q.requires_grad:
            out = self.o_proj(self._absorbed_step(q, new_state, real))
            return fill_padding(out, real), new_state
        if past == 0:
            latents = latent
        elif latent.requires_grad:
            latents = torch.cat([new_state.latent[:, :past], latent], dim=1)
        else:
            latents = new_state.filled()
        keys, values = self.expand(latents)
        mask = None
        if (past > 0 and T > 1) or real is not None:
            query_index = past + torch.arange(T, device=x.device)[:, None]
            mask = torch.arange(past + T, device=x.device)[None, :] <= query_index
        if real is not None:
            # a padded query attends to everything, so its softmax stays finite (never read)
            mask = (mask & new_state.real[:, None, : past + T]) | ~real[:, :, None]
            mask = mask[:, None]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=mask,
            is_causal=T > 1 and past == 0 and mask is None, scale=self.scale)
        out = self.o_proj(rearrange(out, "b h t d -> b t (h d)"))
        return fill_padding(out, real), new_state

    def _absorbed_step(self, q: torch.Tensor, state: MLAState,
                       real: torch.Tensor | None = None) -> torch.Tensor:
        """One query per row, q (B, 1, H, N + R), against the cached latents -> (B, 1, H * V),
        with kv_b_proj absorbed into the query and the output (the module docstring). Computed
        in float32 under half-precision weights: the absorbed products sum over C, not N. A
        padded cache's padded slots are left out (real (B, 1): the query's own padding)."""
        dtype = compute_dtype(q.dtype)
        weight = self.kv_b_proj.weight.to(dtype).view(
            self.n_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_key, w_value = weight.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)
        q_nope, q_rope = q[:, 0].to(dtype).split(
            [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_latent = torch.einsum("bhn,hnc->bhc", q_nope, w_key)
        cached = state.filled().to(dtype)  # (B, L, C + R)
        scores = torch.cat([q_latent, q_rope], dim=-1) @ cached.transpose(1, 2)  # (B, H, L)
        if real is not None:
            allowed = state.real[:, None, : state.length] | ~real[:, :, None]
            scores = scores.masked_fill(~allowed, -torch.inf)
        weights = (scores * self.scale).softmax(dim=-1)
        out_latent = weights @ cached[..., : self.kv_lora_rank]  # (B, H, C)
        out = torch.einsum("bhc,hvc->bhv", out_latent, w_value)
        return out.reshape(q.shape[0], 1, -1).to(q.dtype)


__all__ = ["MLAState", "MultiHeadLatentAttention"]
