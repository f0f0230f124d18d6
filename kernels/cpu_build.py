"""Building zoo's C++ CPU kernels: torch's extension builder, on first use.

Each kernel is one or more source files compiled as one text (a shared header's text first,
so that a change to it changes the text and rebuilds every kernel that uses it). torch builds
it once per machine and text (about 20 s) into a folder of TORCH_EXTENSIONS_DIR (by default
~/.cache/torch_extensions) named by a hash of the text, the flags and torch's version: a later
process, another clone or another virtual environment with the same torch loads the library
found there instead of rebuilding it, and two texts (two branches) keep a library each. The
library registers its operators under `torch.ops.zoo_cpu`.
Where no compiler is found the build fails once, with a warning, and the callers take their
PyTorch paths. ZOO_CPU_KERNELS=0 turns every kernel off.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch

# ATen's vector types pick their instruction set from these macros, as inductor's kernels do
_CAPABILITY_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw",
               "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}


def cpu_kernels_enabled() -> bool:
    return os.environ.get("ZOO_CPU_KERNELS", "1") != "0"


def build(name: str, sources: list[Path], what: str) -> bool:
    """Compile `sources` (joined in order) as the extension `name`; False, with a warning
    that names `what` was not built, where it cannot be."""
    if not cpu_kernels_enabled():
        return False
    from torch.utils.cpp_extension import load_inline

    capability = torch.backends.cpu.get_cpu_capability()
    # -fopenmp: at::parallel_for is inlined from ATen's headers and runs serially without it
    # (the library resolves to the libgomp torch has already loaded)
    flags = ["-O3", "-fopenmp", *_CAPABILITY_FLAGS.get(capability, [])]
    text = "\n".join(source.read_text() for source in sources)
    extension = f"{name}_{capability.lower()}_{_build_key(text, flags)}"
    if _load_built(extension):
        return True
    try:
        load_inline(
            extension, cpp_sources=[text], extra_cflags=flags,
            extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False,
        )
    except Exception as error:  # no compiler, no headers: the PyTorch path still works
        # the compiler's own error lines say why; the exception's head is the command line
        lines = str(error).splitlines()
        reason = "\n".join([line for line in lines if "error" in line][:5] or lines[:3])
        warnings.warn(
            f"zoo: {what} did not build ({type(error).__name__}: {reason}); the PyTorch path "
            "stands in", RuntimeWarning, stacklevel=3,
        )
        return False
    return True


def _build_key(text: str, flags: list[str]) -> str:
    """What the library depends on besides the compiler: the text, the flags and torch (its
    headers and ABI); not the path of torch's install, so that clones share one build."""
    parts = [text, *flags, torch.__version__, str(torch.version.git_version)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _load_built(extension: str) -> bool:
    """Load `extension`'s library where an earlier build left it; False where there is none.
    Going through load_inline instead would rebuild it for another virtual environment (torch's
    include paths are in its build file), and costs a compiler check per process."""
    from torch.utils.cpp_extension import LIB_EXT, _get_build_directory

    folder = Path(_get_build_directory(extension, verbose=False))
    library = folder / f"{extension}{LIB_EXT}"
    # a lock file: another process is building it now, and load_inline waits for that one
    if not library.is_file() or (folder / "lock").exists():
        return False
    try:
        torch.ops.load_library(str(library))
    except OSError:  # a damaged library: load_inline builds it again
        return False
    return True
