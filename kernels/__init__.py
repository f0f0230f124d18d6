"""zoo.kernels: each op is a PyTorch reference, a fast PyTorch path for the CPU, Triton kernels
(forward and backward) and, where one pays, a C++ CPU kernel, behind one public function with
`backend=`; `backend.resolve_backend` is the one switch that every op's `backend=` goes through.

This floor imports torch (and, lazily, triton) only.
"""

from .backend import BACKENDS, OpBackends, resolve_backend
from .causal_conv1d import causal_conv1d
from .decode_attention import decode_attention
from .delta_rule import delta_rule, generalized_delta_rule
from .fft_conv import fft_conv
from .linear_attention import linear_attention
from .moe import moe_experts
from .precision import compute_dtype
from .rms_norm import rms_norm
from .selective_scan import selective_scan
from .window_linear_attention import window_linear_attention
from .wkv4 import wkv4

__all__ = [
    "BACKENDS", "OpBackends", "causal_conv1d", "compute_dtype", "decode_attention", "fft_conv",
    "linear_attention", "moe_experts", "resolve_backend", "rms_norm", "selective_scan", "wkv4",
    "window_linear_attention", "delta_rule", "generalized_delta_rule",
]
