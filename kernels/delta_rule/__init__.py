"""`delta_rule`: linear attention whose state is corrected towards each value instead of summed.

One op carries the family by its decay: DeltaNet (none), Gated DeltaNet and Qwen3-Next's
linear layers (one log-decay per step and head), Kimi Delta Attention (one per key channel).
See `reference.py` for the definition and the order of gate and correction.

`generalized_delta_rule` is the diagonal-plus-low-rank transition that RWKV-7 needs
(`generalized_reference.py`); it has the reference, the one-token and the chunked PyTorch forms
and fused recurrent Triton kernels (`generalized_triton.py`), forward and backward.
"""

from __future__ import annotations

import torch

from ..backend import OpBackends, check_log_decay, resolve_backend
from .generalized_chunked import generalized_delta_rule_chunked
from .generalized_recurrent import generalized_delta_rule_recurrent
from .generalized_reference import generalized_delta_rule_reference
from .recurrent import delta_rule_recurrent
from .reference import delta_rule_reference
from .torch_chunked import delta_rule_chunked

OP_BACKENDS = OpBackends("delta_rule")
GENERALIZED_OP_BACKENDS = OpBackends("generalized_delta_rule")


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    decay: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (gated) delta rule: S_t = (I - beta_t k_t k_t^T) A_t S_{t-1} + beta_t k_t v_t^T,
    o_t = S_t^T (scale q_t), with the state S (K, V) per batch and head.

    Args:
        q, k: (B, T, H, K) queries and keys. Normalising them (L2 over K, as DeltaNet, Gated
            DeltaNet and KDA do) is the caller's job; with |k| = 1 and 0 <= beta <= 2 the
            transition is a contraction or a reflection, and the state stays bounded.
        v: (B, T, H, V) values, in q's dtype.
        beta: (B, T, H) the writing strength of each token (usually a sigmoid, in [0, 1]; up to
            2 allows negative eigenvalues).
        decay: log-decay g <= 0, the gate A_t = exp(g_t) applied to the old state before the
            correction: None (DeltaNet, A_t = I); (B, T, H), one per step and head (Gated
            DeltaNet); (B, T, H, K), one per key channel (KDA, A_t = Diag(exp(g_t))).
        scale: multiplies q; default K ** -0.5, as fla and the models it serves use (unlike
            `linear_attention`, whose default is 1.0).
        initial_state: (B, H, K, V), the state before q.
        output_final_state: also return the state after the last token.
        chunk_size: tokens per chunk of the PyTorch chunked form, and the spacing of the Triton
            backward's state checkpoints; any T works, not only multiples of it.
        backend: "auto" (Triton on CUDA, PyTorch otherwise), "torch" (the recurrence for one
            token, the chunked WY form otherwise), "triton" (fused recurrent kernels, K <= 256)
            or "reference".
    Returns:
        (o, final_state): o (B, T, H, V) in q's dtype; final_state (B, H, K, V) in float32
        (float64 for float64 inputs), or None unless `output_final_state`.
    """
    _check_inputs("delta_rule", q, k, v, decay, initial_state, chunk_size)
    B, T, H, _ = q.shape
    if tuple(beta.shape) != (B, T, H):
        raise ValueError(f"delta_rule: beta must be (B, T, H) = {(B, T, H)}, "
                         f"got {tuple(beta.shape)}")
    if not beta.is_floating_point():
        raise ValueError(f"delta_rule: beta must be floating point, got {beta.dtype}")
    backend = resolve_backend(backend, q, OP_BACKENDS)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    args = (q, k, v, beta, decay, scale, initial_state, output_final_state)
    if backend == "reference":
        return delta_rule_reference(*args)
    if backend == "torch" and q.shape[1] == 1:  # one token (decoding): the recurrence itself
        return delta_rule_recurrent(*args)
    if backend == "torch":
        return delta_rule_chunked(*args, chunk_size=chunk_size)
    from .triton_kernels import delta_rule_triton

    return delta_rule_triton(*args, chunk_size=chunk_size)


def generalized_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    decay: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The diagonal-plus-low-rank delta rule: S_t = (Diag(exp(g_t)) + b_t a_t^T) S_{t-1}
    + k_t v_t^T, o_t = S_t^T (scale q_t), with the state S (K, V) per batch and head.

    Args:
        q, k: (B, T, H, K) queries and keys.
        v: (B, T, H, V) values, in q's dtype.
        a, b: (B, T, H, K), in q's dtype: `a` reads the old state (a_t^T S_{t-1}) and `b` is the
            direction that reading is written along (fla's dplr names). RWKV-7:
            a = -kappa_hat, b = kappa_hat * iclr. The delta rule: a = -beta exp(g) k, b = k,
            with beta v for v. Keeping the transition's eigenvalues in [-1, 1] is the caller's job.
        decay: log-decay g <= 0: None (no diagonal decay), (B, T, H) or (B, T, H, K) (RWKV-7's
            w = exp(g) per channel).
        scale: multiplies q; default K ** -0.5 (RWKV-7 reads with 1.0: pass it).
        initial_state: (B, H, K, V), the state before q.
        output_final_state: also return the state after the last token.
        chunk_size: tokens per chunk of the PyTorch chunked form, and the spacing of the Triton
            backward's state checkpoints; any T works, not only multiples of it.
        backend: "auto" (Triton on CUDA, PyTorch otherwise), "torch" (the recurrence for one
            token, the chunked form otherwise), "triton" (fused recurrent kernels, K <= 256)
            or "reference".
    Returns:
        (o, final_state): o (B, T, H, V) in q's dtype; final_state (B, H, K, V) in float32
        (float64 for float64 inputs, on every backend), or None unless `output_final_state`.
    """
    op = "generalized_delta_rule"
    _check_inputs(op, q, k, v, decay, initial_state, chunk_size)
    for name, x in (("a", a), ("b", b)):
        if tuple(x.shape) != tuple(q.shape):
            raise ValueError(f"{op}: {name} must match q's shape {tuple(q.shape)}, "
                             f"got {tuple(x.shape)}")
        if x.dtype != q.dtype:
            raise ValueError(f"{op}: {name} must have q's dtype {q.dtype}, got {x.dtype}")
    backend = resolve_backend(backend, q, GENERALIZED_OP_BACKENDS)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    args = (q, k, v, a, b, decay, scale, initial_state, output_final_state)
    if backend == "reference":
        return generalized_delta_rule_reference(*args)
    if backend == "torch" and q.shape[1] == 1:  # one token (decoding): the recurrence itself
        return generalized_delta_rule_recurrent(*args)
    if backend == "torch":
        return generalized_delta_rule_chunked(*args, chunk_size=chunk_size)
    from .generalized_triton import generalized_delta_rule_triton

    return generalized_delta_rule_triton(*args, chunk_size=chunk_size)


def _check_inputs(op, q, k, v, decay, initial_state, chunk_size) -> None:
    """The checks both ops share: q, k, v, the decay, the initial state and the chunk size."""
    if q.dim() != 4:
        raise ValueError(f"{op}: q must be (B, T, H, K), got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    if T < 1:
        raise ValueError(f"{op}: q has T = 0 tokens; pass at least one")
    if not q.is_floating_point():
        raise ValueError(f"{op}: q must be floating point, got {q.dtype}")
    if tuple(k.shape) != (B, T, H, K):
        raise ValueError(f"{op}: k must match q's shape {(B, T, H, K)}, got {tuple(k.shape)}")
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"{op}: v must be (B, T, H, V) = ({B}, {T}, {H}, V), "
                         f"got {tuple(v.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise ValueError(f"{op}: {name} must have q's dtype {q.dtype}, got {x.dtype}")
    if decay is not None:
        allowed = [(B, T, H), (B, T, H, K)]
        if tuple(decay.shape) not in allowed:
            raise ValueError(f"{op}: decay must be None or one of the shapes (B, T, H), "
                             f"(B, T, H, K) = {allowed}, got {tuple(decay.shape)}")
        if not decay.is_floating_point():
            raise ValueError(f"{op}: decay must be a floating-point log-decay, got {decay.dtype}")
        check_log_decay(op, decay)
    if initial_state is not None:
        V = v.shape[-1]
        if tuple(initial_state.shape) != (B, H, K, V):
            raise ValueError(f"{op}: initial_state must be (B, H, K, V) = {(B, H, K, V)}, "
                             f"got {tuple(initial_state.shape)}")
        if not initial_state.is_floating_point():
            raise ValueError(f"{op}: initial_state must be floating point, "
                             f"got {initial_state.dtype}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")


__all__ = [
    "delta_rule", "delta_rule_chunked", "delta_rule_recurrent", "delta_rule_reference",
    "generalized_delta_rule", "generalized_delta_rule_chunked", "generalized_delta_rule_recurrent",
    "generalized_delta_rule_reference",
]
