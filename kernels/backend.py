"""Backend selection shared by every op: `auto` picks Triton for CUDA tensors outside
torch.compile, PyTorch otherwise."""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton", "reference")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """True when Triton kernels run through the interpreter (CPU tensors, tests in CI)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, x: torch.Tensor, op: str) -> str:
    """Turn `backend=` into a concrete one, with an error naming the op and the allowed values."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        # inside torch.compile, the PyTorch expression: inductor writes its own (Triton, on a
        # GPU) kernels for it in one graph, where a hand-written kernel's launch would break
        # the graph (the CUDA-graphed decode step of Mamba broke in two)
        if torch.compiler.is_compiling():
            return "torch"
        return "triton" if x.is_cuda and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend='triton' needs the triton package (not installed)")
        if not x.is_cuda and not triton_interpreted():
            raise RuntimeError(
                f"{op}: backend='triton' got CPU tensors; set TRITON_INTERPRET=1 before importing "
                "triton to run the kernels through Triton's interpreter, or use backend='torch'"
            )
    return backend
