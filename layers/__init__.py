"""zoo.layers: sequence mixers behind one state contract, FFNs, norms, and their registries.

Importing this package registers every mixer and FFN below; a new mixer module adds one import.
"""

from . import attention, ffn, linear_attention, linformer, moe, retnet  # noqa: F401  (registers the mixers and FFNs)
from . import rwkv4, rwkv6  # noqa: F401  (RWKV-4 and RWKV-6 time and channel mixing)
from . import hyena  # noqa: F401  (Hyena: gated implicit long convolutions)
from . import mamba, mamba2  # noqa: F401  (Mamba-1 and Mamba-2 selective state spaces)
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
