"""The CPU kernel of `decode_attention`: cpu_kernel.cpp, compiled on first use.

torch's C++ extension builder compiles it once per machine and source (about 20 s; cached in
TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions) and registers it as
`torch.ops.zoo_cpu.decode_attention`, an operator that torch.compile calls from its graph.
Where no compiler is found the build fails once, with a warning, and `decode_attention` takes
its PyTorch path. ZOO_CPU_KERNELS=0 turns the kernel off.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernel.cpp")

# ATen's vector types pick their instruction set from these macros, as inductor's kernels do
_CAPABILITY_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw",
               "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}


@functools.cache
def load() -> bool:
    """Build and register the kernel (once per process); False, with a warning, if it cannot."""
    if os.environ.get("ZOO_CPU_KERNELS", "1") == "0":
        return False
    from torch.utils.cpp_extension import load_inline

    capability = torch.backends.cpu.get_cpu_capability()
    # -fopenmp: at::parallel_for is inlined from ATen's headers and runs serially without it
    # (the library resolves to the libgomp torch has already loaded)
    flags = ["-O3", "-fopenmp", *_CAPABILITY_FLAGS.get(capability, [])]
    try:
        load_inline(
            f"zoo_cpu_kernels_{capability.lower()}", cpp_sources=[SOURCE.read_text()],
            extra_cflags=flags, extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False,
        )
    except Exception as error:  # no compiler, no headers: the PyTorch path still works
        # the compiler's own error lines say why; the exception's head is the command line
        lines = str(error).splitlines()
        reason = "\n".join([line for line in lines if "error" in line][:5] or lines[:3])
        warnings.warn(
            f"zoo: the CPU decode-attention kernel did not build ({type(error).__name__}: "
            f"{reason}); decoding uses the PyTorch path", RuntimeWarning, stacklevel=2,
        )
        return False
    if not _registered_fake:  # once per process, however often load() runs
        torch.library.register_fake("zoo_cpu::decode_attention")(_shape_of_output)
        _registered_fake.append(True)
    return True


_registered_fake: list[bool] = []


def _shape_of_output(q, keys_t, values, scale):
    # what torch.compile traces in place of the kernel: the output's shape, dtype and device
    return q.new_empty(q.shape)


def decode_attention_cpu(q: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """q (B, H, D); keys_t (B, H_kv, D, L); values (B, H_kv, L, D), all float32, bfloat16 or
    float16 -> (B, H, D) in their dtype."""
    return torch.ops.zoo_cpu.decode_attention(q, keys_t, values, scale)
