"""`window_linear_attention`: exact softmax attention over the last W tokens plus feature-map
linear attention over every token before them, in one normalisation (LoLCATs, Zhang et al.
2024). See `reference.py` for the definition and `state.py` for the state.
"""

from __future__ import annotations

import torch

from ..backend import resolve_backend
from .recurrent import window_linear_attention_step
from .reference import window_linear_attention_reference, window_linear_attention_weights
from .state import WindowLinearAttentionState, empty_state
from .torch_chunked import window_linear_attention_chunked

OP = "window_linear_attention"


def window_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    *,
    window: int,
    linear_scale: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: WindowLinearAttentionState | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, WindowLinearAttentionState | None]:
    """o_t = (A_t + r B_t) / (a_t + r b_t): softmax over the window (t - W, t] (A, a, around
    the window's maximum score m_t, held constant for gradients) and linear attention over
    the tokens j <= t - W (B = phi_q_t . sum phi_k_j v_j^T, b = phi_q_t . sum phi_k_j).

    Args:
        q, k: (B, T, H, D) queries and keys of the softmax part (after any rotary embedding).
        v: (B, T, H, Dv) values, shared by both parts.
        phi_q, phi_k: (B, T, H, F) non-negative query and key features of the linear part.
        window: W >= 1, how many tokens (the query's own included) the softmax part sees.
        linear_scale: r >= 0 on the linear part, (H,) or (B, H); None means 1.
        scale: multiplies q . k; default D ** -0.5.
        initial_state: the state before q (`WindowLinearAttentionState`: the last W tokens'
            k, v, phi_k, how many of them are filled, and S, z of the older tokens).
        output_final_state: also return the state after the last token.
        chunk_size: query block of the window part and chunk of the linear part (the Triton
            backend needs a power of two >= 16).
        backend: "auto" (Triton on CUDA, PyTorch otherwise; the recurrent step for T = 1 on
            any device), "torch" (chunked; the recurrent step for T = 1), "triton" (its
            kernels for any T) or "reference".
    Returns:
        (o, final_state): o (B, T, H, Dv) in q's dtype; final_state or None. The state's
        windows keep k's, v's and phi_k's dtypes, S and z are float32 (float64 for float64).
    """
    _check_inputs(q, k, v, phi_q, phi_k, window, linear_scale, initial_state, chunk_size)
    requested = backend
    backend = resolve_backend(backend, q, OP)
    args = (q, k, v, phi_q, phi_k, window, linear_scale, scale, initial_state,
            output_final_state)
    if backend == "reference":
        return window_linear_attention_reference(*args)
    if q.shape[1] == 1 and requested != "triton":
        return window_linear_attention_step(*args)
    if backend == "torch":
        return window_linear_attention_chunked(*args, chunk_size)
    from .triton_kernels import window_linear_attention_triton

    return window_linear_attention_triton(*args, chunk_size)


def _check_inputs(q, k, v, phi_q, phi_k, window, linear_scale, state, chunk_size) -> None:
    if q.dim() != 4:
        raise ValueError(f"{OP}: q must be (B, T, H, D), got shape {tuple(q.shape)}")
    B, T, H, D = q.shape
    if T < 1:
        raise ValueError(f"{OP}: q has T = 0 tokens; pass at least one")
    if tuple(k.shape) != (B, T, H, D):
        raise ValueError(f"{OP}: k must match q's shape {(B, T, H, D)}, got {tuple(k.shape)} "
                         "(repeat grouped KV heads to H before the op)")
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"{OP}: v must be (B, T, H, Dv) = ({B}, {T}, {H}, Dv), "
                         f"got {tuple(v.shape)}")
    if phi_q.dim() != 4 or tuple(phi_q.shape[:3]) != (B, T, H):
        raise ValueError(f"{OP}: phi_q must be (B, T, H, F) = ({B}, {T}, {H}, F), "
                         f"got {tuple(phi_q.shape)}")
    if tuple(phi_k.shape) != tuple(phi_q.shape):
        raise ValueError(f"{OP}: phi_k must match phi_q's shape {tuple(phi_q.shape)}, "
                         f"got {tuple(phi_k.shape)}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"{OP}: window must be an int >= 1 (tokens the softmax part sees), "
                         f"got {window!r}")
    if linear_scale is not None:
        if tuple(linear_scale.shape) not in ((H,), (B, H)):
            raise ValueError(f"{OP}: linear_scale must be None, (H,) = {(H,)} or (B, H) = "
                             f"{(B, H)}, got {tuple(linear_scale.shape)}")
        # a negative r could zero the denominator. Reading values back is a device sync on
        # CUDA and a graph break under torch.compile: checked on the CPU in eager mode only.
        if (linear_scale.device.type == "cpu" and not torch.compiler.is_compiling()
                and bool((linear_scale < 0).any())):
            raise ValueError(f"{OP}: linear_scale must be >= 0, got min "
                             f"{linear_scale.min().item():.3g}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{OP}: chunk_size must be a positive int, got {chunk_size!r}")
    if state is not None:
        _check_state(state, B, window, H, D, v.shape[-1], phi_q.shape[-1])


def _check_state(state, B, W, H, D, Dv, F) -> None:
    if not isinstance(state, WindowLinearAttentionState):
        raise TypeError(f"{OP}: initial_state must be a WindowLinearAttentionState, "
                        f"got {type(state).__name__}")
    expected = {"k": (B, W, H, D), "v": (B, W, H, Dv), "phi_k": (B, W, H, F),
                "S": (B, H, F, Dv), "z": (B, H, F)}
    for name, shape in expected.items():
        got = tuple(getattr(state, name).shape)
        if got != shape:
            raise ValueError(f"{OP}: initial_state.{name} must be {shape} for window={W}, "
                             f"got {got}")
    if not 0 <= state.filled <= W:
        raise ValueError(f"{OP}: initial_state.filled must be in 0..window={W}, "
                         f"got {state.filled}")


__all__ = [
    "WindowLinearAttentionState", "empty_state", "window_linear_attention",
    "window_linear_attention_chunked", "window_linear_attention_reference",
    "window_linear_attention_step", "window_linear_attention_weights",
]
