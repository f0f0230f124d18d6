"""`zoo bench NAME`: the harness and its registered entries (one module per family)."""

from .harness import BENCHES, BenchOptions, format_rows, measure, register_bench, run_bench

__all__ = ["BENCHES", "BenchOptions", "format_rows", "measure", "register_bench", "run_bench"]


def load_entries() -> None:
    """Import the entry modules (they import models and kernels, so only when asked)."""
    from . import (  # noqa: F401
        complexity,
        compress,
        decode,
        decode_attention,
        hyena,
        linear_attention,
        linearize_ablation,
        mamba,
        model,
        moe,
        mqar,
        rwkv,
        serve,
        state_quant,
    )
