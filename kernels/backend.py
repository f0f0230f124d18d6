"""The one backend switch of every op: which forms an op has, and which one `backend=` means.

An op's forms are the PyTorch reference ("reference"), a fast PyTorch path ("torch"), Triton
kernels ("triton") and a C++ CPU kernel ("cpu"); `OpBackends` says which of them an op has.
`auto` picks, in order:
- the PyTorch path when the inputs need gradients and the kernels have no backward;
- the C++ kernel for CPU tensors of a dtype it takes, where it built;
- Triton for CUDA tensors outside torch.compile;
- the PyTorch path ("torch", or "reference" for an op without a fast PyTorch path).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

# what most ops accept: PyTorch and Triton forms, no C++ kernel
BACKENDS = ("auto", "torch", "triton", "reference")


@dataclass(frozen=True)
class OpBackends:
    """The forms one op has, for `resolve_backend`.

    name: the op's public name, which errors start with.
    torch, triton: whether it has a fast PyTorch path and Triton kernels.
    cpu_kernel: None where the op has no C++ CPU kernel; else a function that says whether the
        kernel is usable here (built, not turned off by ZOO_CPU_KERNELS=0).
    cpu_dtypes: the dtypes the C++ kernel takes.
    backward: whether the Triton and C++ kernels have a backward.
    """

    name: str
    torch: bool = True
    triton: bool = True
    cpu_kernel: Callable[[], bool] | None = None
    cpu_dtypes: tuple[torch.dtype, ...] = ()
    backward: bool = True

    @property
    def backends(self) -> tuple[str, ...]:
        """The values `backend=` accepts, "auto" first."""
        forms = (("auto", True), ("torch", self.torch), ("triton", self.triton),
                 ("cpu", self.cpu_kernel is not None), ("reference", True))
        return tuple(name for name, has in forms if has)

    @property
    def pytorch_path(self) -> str:
        """Where `auto` goes when no kernel applies."""
        return "torch" if self.torch else "reference"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """True when Triton kernels run through the interpreter (CPU tensors, tests in CI)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requires_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd would record an op on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def resolve_backend(backend: str, x: torch.Tensor, op: str | OpBackends, *,
                    needs_grad: bool = False) -> str:
    """Turn `backend=` into the concrete form to run, with errors naming the op and the values.

    Args:
        backend: what the caller passed ("auto" or one of the op's forms).
        x: the input whose device and dtype decide (e.g. q, (B, T, H, D)).
        op: the op's `OpBackends`, or its name for an op with PyTorch and Triton forms only.
        needs_grad: the inputs require gradients (see `requires_grad`); only ops whose kernels
            have no backward need to say so.
    """
    op = OpBackends(op) if isinstance(op, str) else op
    if backend not in op.backends:
        raise ValueError(f"{op.name}: backend={backend!r} is not one of {op.backends}")
    if backend == "auto":
        return _auto(op, x, needs_grad)
    if backend in ("triton", "cpu") and needs_grad and not op.backward:
        raise ValueError(
            f"{op.name}: backend={backend!r} has no backward; inputs that require gradients "
            f"need backend={op.pytorch_path!r} or 'reference'"
        )
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(
                f"{op.name}: backend='triton' needs the triton package (not installed)")
        if not x.is_cuda and not triton_interpreted():
            raise RuntimeError(
                f"{op.name}: backend='triton' got CPU tensors; set TRITON_INTERPRET=1 before "
                f"importing triton to run the kernels through Triton's interpreter, or use "
                f"backend={op.pytorch_path!r}"
            )
    if backend == "cpu":
        if x.device.type != "cpu" or x.dtype not in op.cpu_dtypes:
            raise ValueError(
                f"{op.name}: backend='cpu' takes CPU tensors of {op.cpu_dtypes}, got {x.dtype} "
                f"on {x.device}"
            )
        if not op.cpu_kernel():
            raise RuntimeError(f"{op.name}: the CPU kernel did not build (see the warning)")
    return backend


def _auto(op: OpBackends, x: torch.Tensor, needs_grad: bool) -> str:
    if needs_grad and not op.backward:
        return op.pytorch_path
    # the C++ kernel stays inside torch.compile: it is a registered operator with a fake
    # (shape-only) form, so the graph calls it like any ATen op
    if (op.cpu_kernel is not None and x.device.type == "cpu" and x.dtype in op.cpu_dtypes
            and op.cpu_kernel()):
        return "cpu"
    # inside torch.compile, the PyTorch expression: inductor writes its own (Triton, on a
    # GPU) kernels for it in one graph, where a hand-written kernel's launch would break
    # the graph (the CUDA-graphed decode step of Mamba broke in two)
    if op.triton and x.is_cuda and not torch.compiler.is_compiling() and triton_available():
        return "triton"
    return op.pytorch_path


def check_log_decay(op: str, decay: torch.Tensor) -> None:
    """A log-decay g must be <= 0 (a positive one grows the state). Reading the values back is a
    device sync on CUDA and a graph break under torch.compile, so it is checked on the CPU in
    eager mode only."""
    if (decay.device.type == "cpu" and not torch.compiler.is_compiling()
            and bool((decay > 0).any())):
        raise ValueError(f"{op}: decay is a log-decay and must be <= 0, got max "
                         f"{decay.max().item():.3g}")
