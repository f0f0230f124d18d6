"""`linear_attention`: causal linear attention with optional decay, bonus and normalisation.

One op carries the family: plain linear attention (Katharopoulos et al.), RetNet's retention
(per-head constant decay), Mamba-2's SSD and scalar-gated linear attention (per-step decay),
GLA and RWKV-6 (per-channel decay, RWKV-6's bonus u). See `reference.py` for the definition.
"""

from __future__ import annotations

import functools

import torch

from ..backend import OpBackends, check_log_decay, resolve_backend
from ..precision import compute_dtype
from .recurrent import linear_attention_recurrent
from .reference import NORMALIZE_EPS, linear_attention_reference
from .torch_chunked import linear_attention_chunked

OP_BACKENDS = OpBackends("linear_attention")


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    decay: torch.Tensor | None = None,
    bonus: torch.Tensor | None = None,
    scale: float | None = None,
    normalize: bool = False,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal linear attention: S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = (scale q_t)^T S_t.

    Args:
        q, k: (B, T, H, K) queries and keys (after any feature map).
        v: (B, T, H, V) values.
        decay: log-decay g <= 0 (so exp(g) in (0, 1]), in one of four forms:
            None: g = 0, plain causal linear attention;
            (H,): one constant per head (RetNet: log gamma);
            (B, T, H): per step and head (Mamba-2's SSD, scalar-gated linear attention);
            (B, T, H, K): per step, head and key channel (GLA, RWKV-6).
        bonus: (H, K) or None, RWKV-6's u ("time_first"): the state is read before token t is
            added, o_t = scale q_t^T S_{t-1} + scale (q_t . (u * k_t)) v_t. S's recurrence is
            unchanged.
        scale: multiplies q; default 1.0 (not K ** -0.5: pass that if you want it).
        normalize: divide by the Katharopoulos denominator, o_t = num_t / (scale q_t . z_t +
            1e-6), z_t the decayed sum of keys (the same recurrence with v = 1). The state then
            carries z as its last column: (B, H, K, V + 1), v augmented with ones; pass it back
            as `initial_state` to continue.
        initial_state: (B, H, K, V) (or (B, H, K, V + 1) with `normalize`), the state before q.
        output_final_state: also return the state after the last token.
        chunk_size: tokens per chunk of the chunked forms (the Triton backend needs a power of
            two >= 16); any T works, not only multiples of it. The Triton backend takes
            K <= 256 and any V.
        backend: "auto" (Triton on CUDA, PyTorch otherwise), "torch" (the recurrence for one
            token, chunks otherwise), "triton" or "reference".
    Returns:
        (o, final_state): o (B, T, H, V) in q's dtype; final_state (B, H, K, V[+1]) in float32
        (float64 for float64 inputs) or None.
    """
    _check_inputs(q, k, v, decay, bonus, normalize, initial_state, chunk_size)
    backend = resolve_backend(backend, q, OP_BACKENDS)
    scale = 1.0 if scale is None else float(scale)
    if backend == "reference":
        return linear_attention_reference(q, k, v, decay, bonus, scale, normalize,
                                          initial_state, output_final_state)
    if backend == "torch" and q.shape[1] == 1:  # one token (decoding): the recurrence itself
        core = linear_attention_recurrent
    elif backend == "torch":
        core = functools.partial(linear_attention_chunked, chunk_size=chunk_size)
    else:
        from .triton_kernels import linear_attention_triton

        core = functools.partial(linear_attention_triton, chunk_size=chunk_size)
    if not normalize:
        return core(q, k, v, decay, bonus, scale, initial_state, output_final_state)
    # z_t rides along as a last value column of ones, so numerator and denominator share the
    # state, the decay and every backend's kernels.
    ones = torch.ones_like(v[..., :1])
    num, final_state = core(q, k, torch.cat([v, ones], -1), decay, bonus, scale, initial_state,
                            output_final_state, output_dtype=compute_dtype(q.dtype))
    o = num[..., :-1] / (num[..., -1:] + NORMALIZE_EPS)
    return o.to(q.dtype), final_state


def _check_inputs(q, k, v, decay, bonus, normalize, initial_state, chunk_size) -> None:
    op = "linear_attention"
    if q.dim() != 4:
        raise ValueError(f"{op}: q must be (B, T, H, K), got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    if tuple(k.shape) != (B, T, H, K):
        raise ValueError(f"{op}: k must match q's shape {(B, T, H, K)}, got {tuple(k.shape)}")
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"{op}: v must be (B, T, H, V) = ({B}, {T}, {H}, V), "
                         f"got {tuple(v.shape)}")
    if T < 1:
        raise ValueError(f"{op}: q has T = 0 tokens; pass at least one")
    V = v.shape[-1]
    if decay is not None:
        allowed = [(H,), (B, T, H), (B, T, H, K)]
        if tuple(decay.shape) not in allowed:
            raise ValueError(f"{op}: decay must be None or one of the shapes (H,), (B, T, H), "
                             f"(B, T, H, K) = {allowed}, got {tuple(decay.shape)}")
        if not decay.is_floating_point():
            raise ValueError(f"{op}: decay must be a floating-point log-decay, got {decay.dtype}")
        check_log_decay(op, decay)
    if bonus is not None and tuple(bonus.shape) != (H, K):
        raise ValueError(f"{op}: bonus must be (H, K) = {(H, K)}, got {tuple(bonus.shape)}")
    if initial_state is not None:
        expected = (B, H, K, V + 1) if normalize else (B, H, K, V)
        if tuple(initial_state.shape) != expected:
            what = "(B, H, K, V + 1) with normalize=True" if normalize else "(B, H, K, V)"
            raise ValueError(f"{op}: initial_state must be {what} = {expected}, "
                             f"got {tuple(initial_state.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")


__all__ = [
    "linear_attention", "linear_attention_chunked", "linear_attention_recurrent",
    "linear_attention_reference",
]
