"""Mixture-of-experts FFN: a router picks top_k of n_experts per token (Mixtral, Switch,
DeepSeekMoE), the stacked experts run through `zoo.kernels.moe_experts`.

Parameter names and shapes are those of transformers' Mixtral sparse block, so a Mixtral
checkpoint maps by name (model.layers.i.mlp.* -> layers.i.ffn.*):
    gate.weight                (E, D)       the router, no bias
    experts.gate_up_proj       (E, 2I, D)   gate rows first, then up rows (swiglu experts)
    experts.down_proj          (E, D, I)
Options that are not Mixtral's: `mlp` experts (experts.up_proj (E, I, D), GELU), always-on shared
experts (DeepSeekMoE; `shared_experts.*`, one dense FFN of n_shared_experts * I hidden units,
which equals the sum of n_shared_experts separate experts), Qwen3-Next's shared expert of its own
size scaled by sigmoid(shared_expert_gate x) (`shared_expert_gate.weight` (1, D)), Switch's
capacity factor, router jitter and the ST-MoE router z-loss, and DeepSeek-V3's router (Kimi
Linear's): sigmoid scores, a per-expert bias for the choice only (`expert_bias.bias`, transformers'
gate.e_score_correction_bias), group-limited top-k and a scale on the routed weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zoo.kernels import moe_experts

from .base import FFN, at_least_float32, check_padding_mask, fill_padding
from .ffn import MLP, SwiGLU, swiglu_hidden_size
from .linear import Linear
from .registry import register_ffn

EXPERT_TYPES = ("swiglu", "mlp")
ROUTER_SCORINGS = ("softmax", "sigmoid")
# transformers' sigmoid routers add this to the top-k sum: every score can underflow to 0
RENORMALIZE_EPS = 1e-20


class Experts(nn.Module):
    """n_experts FFNs with their weights stacked in one tensor per projection.

    forward(x (N, D), expert_ids (N, K), weights (N, K)) -> (N, D).
    """

    def __init__(self, n_experts: int, d_model: int, hidden_size: int, expert_type: str,
                 backend: str = "auto"):
        super().__init__()
        self.n_experts, self.hidden_size, self.expert_type = n_experts, hidden_size, expert_type
        self.backend = backend
        # nn.Linear's default init (uniform, bound 1/sqrt(fan_in)), expert by expert
        in_bound, out_bound = 1 / math.sqrt(d_model), 1 / math.sqrt(hidden_size)
        rows = 2 * hidden_size if expert_type == "swiglu" else hidden_size
        up = nn.Parameter(torch.empty(n_experts, rows, d_model).uniform_(-in_bound, in_bound))
        if expert_type == "swiglu":
            self.gate_up_proj = up
        else:
            self.up_proj = up
        self.down_proj = nn.Parameter(
            torch.empty(n_experts, d_model, hidden_size).uniform_(-out_bound, out_bound)
        )

    @property
    def in_proj(self) -> nn.Parameter:
        return self.gate_up_proj if self.expert_type == "swiglu" else self.up_proj

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        activation = "swiglu" if self.expert_type == "swiglu" else "gelu"
        return moe_experts(x, self.in_proj, self.down_proj, expert_ids, weights,
                           activation=activation, backend=self.backend)


def slots_per_expert(expert_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(E,) how many slots of expert_ids (any shape; -1 = dropped, counted nowhere) chose each
    expert. A fixed-size index_add, where bincount's data-dependent size breaks a compiled
    decode step in two."""
    flat = expert_ids.reshape(-1) + 1  # dropped slots land in bin 0
    counts = torch.zeros(n_experts + 1, dtype=torch.long, device=flat.device)
    return counts.index_add_(0, flat, torch.ones_like(flat))[1:]


def load_balancing_loss(probs: torch.Tensor, tokens_per_expert: torch.Tensor,
                        real: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer's auxiliary loss (its eq. 4-6): E * sum_i f_i * P_i.

    probs: (N, E) router probabilities; tokens_per_expert: (E,) slots routed to each expert.
    f_i is the fraction of the N * K routed slots that chose expert i (not differentiable), P_i
    the mean router probability of expert i (carries the gradient). Both sum to 1, so uniform
    routing gives the minimum, 1, and everything on one expert gives E. (transformers' Mixtral
    divides by N instead of N * K: its value is K times this one.) real: (N,) bool, the tokens
    that count (a padded batch's real ones), or None for all.
    """
    E = probs.shape[-1]
    f = tokens_per_expert.to(probs.dtype) / tokens_per_expert.sum().clamp(min=1)
    return E * (f * _mean_over_tokens(probs, real)).sum()


def _mean_over_tokens(values: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """values (N, ...) averaged over the tokens where real (N,) is True (all when None),
    without reading the count back to the host."""
    if real is None:
        return values.mean(0)
    weights = real.to(values.dtype).reshape(-1, *([1] * (values.dim() - 1)))
    return (values * weights).sum(0) / weights.sum().clamp(min=1)


def router_z_loss(logits: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE's router z-loss (its eq. 5): mean over tokens of logsumexp(logits)^2.

    Keeps router logits small, so the softmax stays in the range where float32 and bf16 are
    exact enough. logits: (N, E); real: (N,) bool, the tokens that count, or None for all.
    """
    return _mean_over_tokens(torch.logsumexp(logits, dim=-1).pow(2), real)


def apply_capacity(expert_ids: torch.Tensor, n_experts: int,
                   capacity: int | torch.Tensor) -> torch.Tensor:
    """Drop the slots beyond each expert's capacity; dropped slots get expert id -1.

    expert_ids: (N, K), -1 at slots already dropped (a padded token's), which take no place in
    any queue. Every token's first choice is served before any second choice (GShard's
    priority; for K = 1 this is Switch's first come, first served in token order).
    """
    N, K = expert_ids.shape
    choice_major = expert_ids.t().reshape(-1)  # (K * N,): all first choices, then all second...
    onehot = F.one_hot(choice_major + 1, n_experts + 1)[:, 1:]  # a dropped slot: all zeros
    position = (onehot.cumsum(0) * onehot).sum(-1)  # 1-based place in its expert's queue
    kept = (position <= capacity).view(K, N).t()
    return torch.where(kept, expert_ids, -1)


class ExpertBias(nn.Module):
    """DeepSeek-V3's per-expert bias (auxiliary-loss-free load balancing; Kimi Linear's
    e_score_correction_bias): added to the router's scores when choosing experts, never to the
    weights the chosen experts get. Kept float32 through a cast to half precision: the choice
    turns on score margins that bf16 cannot hold."""

    def __init__(self, n_experts: int):
        super().__init__()
        self.register_buffer("bias", torch.zeros(n_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        return super()._apply(at_least_float32(fn), recurse)


def limit_to_groups(choice: torch.Tensor, n_groups: int, top_k_groups: int) -> torch.Tensor:
    """Group-limited routing (DeepSeek-V3, Kimi Linear): the experts are split into n_groups
    equal groups, each group scored by the sum of its two best experts' scores, and only the
    experts of the top_k_groups best groups stay choosable; the others get -inf.
    choice: (N, E) -> (N, E)."""
    N, E = choice.shape
    grouped = choice.view(N, n_groups, E // n_groups)
    group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # (N, n_groups)
    best = group_scores.topk(top_k_groups, dim=-1).indices
    kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    return grouped.masked_fill(~kept[..., None], -torch.inf).view(N, E)


@register_ffn("moe")
class MoE(FFN):
    """Routed mixture of experts, plus optional shared experts. x: (B, T, d_model).

    Forward sets `self.aux_loss` (aux_loss_coef * load-balancing loss + z_loss_coef * z-loss, a
    scalar) and `self.last_stats` (detached, for logging): tokens_per_expert (E,) slots routed to
    each expert, dropped_per_expert (E,) slots dropped by capacity, dropped_tokens (tokens that
    lost every slot and so get only the shared experts' output, zero without them: the block's
    residual passes them through), load_balancing_loss, z_loss. Inside a compiled forward
    without gradients (the compiled decode step) neither is computed: aux_loss is None and
    last_stats empty.

    Options:
        n_experts, top_k: routed experts, and how many each token uses.
        hidden_size: each expert's hidden size I (fine-grained experts: many small ones);
            default that of the dense FFN of the same type.
        expert_type: "swiglu" (Mixtral) or "mlp" (GELU, Switch).
        n_shared_experts: always-on experts of the same size (DeepSeekMoE), 0 for none.
        shared_expert_hidden_size: the shared experts' total hidden size, where it is not
            n_shared_experts * hidden_size (Qwen3-Next's shared_expert_intermediate_size).
        shared_expert_gate: scale the shared experts' output per token by
            sigmoid(shared_expert_gate x), a learned (1, D) gate (Qwen3-Next).
        normalize_weights: renormalise the top_k probabilities to sum to 1 (Mixtral). Default:
            True when top_k > 1; False for top-1, where it would make every weight 1 and leave
            the router no gradient from the language-model loss (Switch uses the raw p).
        capacity_factor: Switch's capacity, ceil(capacity_factor * N * top_k / n_experts) slots
            per expert over the N tokens of a forward; None = unlimited. Applied in training
            only: at inference every token reaches its experts, so decoding token by token gives
            the same output as the whole sequence (capacity depends on how many tokens share a
            forward).
        jitter_noise: multiply the router's input by U(1 - eps, 1 + eps) in training (Switch).
        aux_loss_coef, z_loss_coef: the losses' weights in aux_loss (Switch 0.01, ST-MoE 0.001).
        router_scoring: "softmax" over the experts (Mixtral, Switch) or an independent
            "sigmoid" per expert (DeepSeek-V3, Kimi Linear); the load-balancing loss then takes
            the sigmoid scores normalised to sum to 1 per token.
        score_correction_bias: a per-expert bias (`ExpertBias`) added to the scores for the
            choice only (DeepSeek-V3's auxiliary-loss-free balancing; imported, not trained).
        n_expert_groups, top_k_groups: group-limited routing (`limit_to_groups`): top_k is
            chosen among the experts of the top_k_groups best of n_expert_groups groups
            (default: every group; 1 group = no limit).
        routed_scaling_factor: multiplies the routed experts' weights after the
            renormalisation (DeepSeek-V3 2.5, Kimi Linear 2.446).
        backend: moe_experts backend ("auto", "torch", "triton", "reference").
    """

    def __init__(
        self,
        d_model: int,
        *,
        n_experts: int = 8,
        top_k: int = 2,
        hidden_size: int | None = None,
        expert_type: str = "swiglu",
        n_shared_experts: int = 0,
        shared_expert_hidden_size: int | None = None,
        shared_expert_gate: bool = False,
        normalize_weights: bool | None = None,
        capacity_factor: float | None = None,
        jitter_noise: float = 0.0,
        aux_loss_coef: float = 0.01,
        z_loss_coef: float = 0.001,
        router_scoring: str = "softmax",
        score_correction_bias: bool = False,
        n_expert_groups: int = 1,
        top_k_groups: int | None = None,
        routed_scaling_factor: float = 1.0,
        backend: str = "auto",
    ):
        super().__init__(d_model)
        if expert_type not in EXPERT_TYPES:
            raise ValueError(f"moe: expert_type={expert_type!r} is not one of {EXPERT_TYPES}")
        if n_experts < 1:
            raise ValueError(f"moe: n_experts={n_experts} must be >= 1")
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"moe: top_k={top_k} must be in [1, n_experts={n_experts}]")
        if n_shared_experts < 0:
            raise ValueError(f"moe: n_shared_experts={n_shared_experts} must be >= 0")
        if not n_shared_experts and (shared_expert_hidden_size is not None or shared_expert_gate):
            raise ValueError("moe: shared_expert_hidden_size and shared_expert_gate need "
                             f"n_shared_experts >= 1, got n_shared_experts={n_shared_experts}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"moe: capacity_factor={capacity_factor} must be > 0 or None")
        if not 0.0 <= jitter_noise < 1.0:
            raise ValueError(f"moe: jitter_noise={jitter_noise} must be in [0, 1)")
        if router_scoring not in ROUTER_SCORINGS:
            raise ValueError(
                f"moe: router_scoring={router_scoring!r} is not one of {ROUTER_SCORINGS}")
        top_k_groups = n_expert_groups if top_k_groups is None else top_k_groups
        self._check_groups(n_experts, top_k, n_expert_groups, top_k_groups)
        if hidden_size is None:
            hidden_size = swiglu_hidden_size(d_model) if expert_type == "swiglu" else 4 * d_model
        self.n_experts, self.top_k, self.hidden_size = n_experts, top_k, hidden_size
        self.normalize_weights = top_k > 1 if normalize_weights is None else normalize_weights
        self.capacity_factor, self.jitter_noise = capacity_factor, jitter_noise
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.gate = Linear(d_model, n_experts, bias=False)
        self.experts = Experts(n_experts, d_model, hidden_size, expert_type, backend)
        self.shared_experts: nn.Module | None = None
        if n_shared_experts:
            dense = SwiGLU if expert_type == "swiglu" else MLP
            shared_hidden = shared_expert_hidden_size or n_shared_experts * hidden_size
            self.shared_experts = dense(d_model, hidden_size=shared_hidden, bias=False)
        self.shared_expert_gate = Linear(d_model, 1, bias=False) if shared_expert_gate else None
        self.router_scoring, self.routed_scaling_factor = router_scoring, routed_scaling_factor
        self.n_expert_groups, self.top_k_groups = n_expert_groups, top_k_groups
        self.expert_bias = ExpertBias(n_experts) if score_correction_bias else None
        self.last_stats: dict[str, torch.Tensor] = {}

    @staticmethod
    def _check_groups(n_experts: int, top_k: int, n_groups: int, top_k_groups: int) -> None:
        if n_experts % n_groups:
            raise ValueError(f"moe: n_experts={n_experts} is not divisible by "
                             f"n_expert_groups={n_groups}")
        if not 1 <= top_k_groups <= n_groups:
            raise ValueError(f"moe: top_k_groups={top_k_groups} must be in [1, "
                             f"n_expert_groups={n_groups}]")
        per_group = n_experts // n_groups
        if n_groups > 1 and per_group < 2:
            raise ValueError(f"moe: n_expert_groups={n_groups} leaves {per_group} expert per "
                             "group; a group is scored by its two best experts, so it needs >= 2")
        if top_k > top_k_groups * per_group:
            raise ValueError(f"moe: top_k={top_k} exceeds the {top_k_groups * per_group} experts "
                             f"of top_k_groups={top_k_groups} groups of {per_group}")

    def route(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, D) -> logits, probs (N, E) float32; expert_ids (N, K), weights (N, K) float32."""
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        # the softmax and top-k in float32, as Mixtral: bf16 ties and rounding flip choices
        logits = self.gate(x).float()
        if self.router_scoring == "softmax":
            scores = probs = logits.softmax(-1)
        else:  # DeepSeek-V3's router, as transformers' Kimi Linear runs it
            scores = logits.sigmoid()
            probs = scores / scores.sum(-1, keepdim=True).clamp_min(RENORMALIZE_EPS)
        # the expert bias and the group limit steer which experts are chosen; the chosen ones
        # are weighted by their plain scores
        choice = scores if self.expert_bias is None else scores + self.expert_bias.bias
        if self.n_expert_groups > 1:
            choice = limit_to_groups(choice, self.n_expert_groups, self.top_k_groups)
        if choice is scores:
            weights, expert_ids = scores.topk(self.top_k, dim=-1)
        else:
            expert_ids = choice.topk(self.top_k, dim=-1).indices
            weights = scores.gather(1, expert_ids)
        if self.normalize_weights:
            weights = weights / (weights.sum(-1, keepdim=True) + RENORMALIZE_EPS)
        if self.routed_scaling_factor != 1.0:
            weights = weights * self.routed_scaling_factor
        return logits, probs, expert_ids, weights

    def _combine(self, flat: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        """The routed experts' weighted outputs plus the shared experts'. flat: (N, D)."""
        y = self.experts(flat, expert_ids, weights)
        if self.shared_experts is not None:
            shared = self.shared_experts(flat)[0]
            if self.shared_expert_gate is not None:
                shared = shared * torch.sigmoid(self.shared_expert_gate(flat))
            y = y + shared
        return y

    def capacity(self, n_tokens: int | torch.Tensor) -> int | torch.Tensor | None:
        """Slots per expert for a forward over n_tokens (a tensor for a padded batch's real
        tokens, left on its device); None when unlimited (inference too)."""
        if self.capacity_factor is None or not self.training:
            return None
        if isinstance(n_tokens, torch.Tensor):
            # float64, as Python computes the unpadded count: the same rounding at the ceiling
            n_tokens = n_tokens.to(torch.float64)
            return torch.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)

    def forward(self, x: torch.Tensor, state=None,
                padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        """x (B, T, D) -> (y, None). With padding_mask (B, T) (True at real tokens) a padded
        token takes no expert slot, no capacity and no part in the losses or the statistics, so
        the real tokens are routed and weighed as they would be alone; its output is zero."""
        check_padding_mask(x, padding_mask, "moe")
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        real = None if padding_mask is None else padding_mask.reshape(-1)
        logits, probs, expert_ids, weights = self.route(flat)
        if real is not None:
            expert_ids = torch.where(real[:, None], expert_ids, -1)
        if torch.compiler.is_compiling() and not torch.is_grad_enabled():
            # a compiled inference step (zoo.infer's decode loop): nothing can backpropagate the
            # losses, and a compiled graph hands every tensor set as a module attribute back to
            # Python: the bookkeeping was a quarter of mixtral-tiny's compiled decode step
            self.aux_loss, self.last_stats = None, {}
            y = self._combine(flat, expert_ids, weights).view(shape)
            return fill_padding(y, padding_mask), None
        E = self.n_experts
        routed = slots_per_expert(expert_ids, E)
        capacity = self.capacity(flat.shape[0] if real is None else real.sum())
        if capacity is not None:
            expert_ids = apply_capacity(expert_ids, E, capacity)
        kept = slots_per_expert(expert_ids, E)
        y = self._combine(flat, expert_ids, weights)
        lb_loss = load_balancing_loss(probs, routed, real)
        z_loss = router_z_loss(logits, real)
        self.aux_loss = self.aux_loss_coef * lb_loss + self.z_loss_coef * z_loss
        lost_every_slot = (expert_ids < 0).all(-1)
        self.last_stats = {
            "tokens_per_expert": routed.detach(),
            "dropped_per_expert": (routed - kept).detach(),
            "dropped_tokens": (lost_every_slot if real is None
                               else lost_every_slot & real).sum().detach(),
            "load_balancing_loss": lb_loss.detach(),
            "z_loss": z_loss.detach(),
        }
        return fill_padding(y.view(shape), padding_mask), None
