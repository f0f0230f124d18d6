"""zoo.layers: sequence mixers behind one state contract, FFNs, norms, and their registries.

Importing this package registers every mixer and FFN below; a new mixer module adds one import.
"""

# Importing the modules registers their mixers and FFNs.
from . import (  # noqa: F401
    attention,
    bounded_memory,
    deltanet,
    ffn,
    gated_deltanet,
    hyena,
    kda,
    linear_attention,
    linformer,
    mamba,
    mamba2,
    mla,
    moe,
    retnet,
    rwkv4,
    rwkv6,
    rwkv7,
    window_linear_attention,
)
from .base import FFN, Mixer, MixerState
from .norms import RMSNorm, build_norm
from .registry import (
    FFNS,
    MIXERS,
    build_ffn,
    build_mixer,
    options_of,
    register_ffn,
    register_mixer,
    validate_ffn_spec,
    validate_mixer_spec,
)

__all__ = [
    "FFN", "FFNS", "MIXERS", "Mixer", "MixerState", "RMSNorm", "build_ffn", "build_mixer",
    "build_norm", "options_of", "register_ffn", "register_mixer", "validate_ffn_spec",
    "validate_mixer_spec",
]
