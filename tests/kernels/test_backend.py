import importlib

import pytest
import torch

from zoo.kernels import (
    BACKENDS,
    OpBackends,
    decode_attention,
    resolve_backend,
    rms_norm,
    transformer_step,
)
from zoo.kernels.decode_attention import OP_BACKENDS as DECODE_ATTENTION


def _with_kernel(usable=True, calls=None, **options):
    """An op with a C++ CPU kernel whose availability the test decides (and counts)."""
    def available():
        if calls is not None:
            calls.append(True)
        return usable

    return OpBackends("my_op", cpu_kernel=available,
                      cpu_dtypes=(torch.float32, torch.bfloat16), **options)


def test_each_op_lists_its_own_backends():
    assert OpBackends("my_op").backends == BACKENDS == ("auto", "torch", "triton", "reference")
    assert DECODE_ATTENTION.backends == ("auto", "torch", "triton", "cpu", "reference")
    assert transformer_step.OP_BACKENDS.backends == ("auto", "cpu", "reference")


def test_unknown_backend_names_the_op_the_value_and_the_allowed_values():
    x = torch.randn(3)
    allowed = r"\('auto', 'torch', 'triton', 'cpu', 'reference'\)"
    with pytest.raises(ValueError, match=rf"my_op: backend='fast' is not one of {allowed}"):
        resolve_backend("fast", x, _with_kernel())
    with pytest.raises(ValueError, match=r"rms_norm: backend='fast' is not one of \('auto'"):
        rms_norm(torch.randn(2, 4), torch.ones(4), backend="fast")


def test_cpu_where_the_op_has_no_cpp_kernel_is_named():
    with pytest.raises(ValueError, match=r"my_op: backend='cpu' is not one of \('auto', 'torch', "
                                         r"'triton', 'reference'\)"):
        resolve_backend("cpu", torch.randn(3), "my_op")
    with pytest.raises(ValueError, match="rms_norm: backend='cpu' is not one of"):
        rms_norm(torch.randn(2, 4), torch.ones(4), backend="cpu")


def test_an_op_name_stands_for_torch_and_triton_forms():
    x = torch.randn(3)
    assert resolve_backend("auto", x, "my_op") == "torch"
    assert resolve_backend("reference", x, "my_op") == "reference"
    assert resolve_backend("torch", x, OpBackends("my_op")) == "torch"


def test_auto_takes_the_cpp_kernel_on_the_cpu_for_its_dtypes():
    calls = []
    op = _with_kernel(calls=calls)
    assert resolve_backend("auto", torch.randn(3), op) == "cpu"
    assert resolve_backend("auto", torch.randn(3, dtype=torch.bfloat16), op) == "cpu"
    assert len(calls) == 2
    # a dtype the kernel does not take never asks whether it built (no build for nothing)
    assert resolve_backend("auto", torch.randn(3, dtype=torch.float64), op) == "torch"
    assert len(calls) == 2


def test_auto_falls_back_to_the_pytorch_path_where_the_kernel_did_not_build():
    x = torch.randn(3)
    assert resolve_backend("auto", x, _with_kernel(usable=False)) == "torch"
    # without a fast PyTorch form (the transformer step), the reference stands in
    assert resolve_backend("auto", x, _with_kernel(usable=False, torch=False)) == "reference"


def test_auto_takes_the_pytorch_path_for_gradients_where_the_kernels_have_none():
    x = torch.randn(3)
    assert resolve_backend("auto", x, _with_kernel(backward=False), needs_grad=True) == "torch"
    assert resolve_backend("auto", x, _with_kernel(backward=True), needs_grad=True) == "cpu"
    with pytest.raises(ValueError, match="my_op: backend='cpu' has no backward"):
        resolve_backend("cpu", x, _with_kernel(backward=False), needs_grad=True)


def test_auto_never_takes_triton_on_the_cpu():
    op = OpBackends("my_op")
    assert resolve_backend("auto", torch.randn(3), op) == "torch"
    assert resolve_backend("auto", torch.randn(3, dtype=torch.float16), op) == "torch"


def test_explicit_cpu_checks_device_dtype_and_build():
    with pytest.raises(ValueError, match=r"my_op: backend='cpu' takes CPU tensors of .*bfloat16"):
        resolve_backend("cpu", torch.randn(3, dtype=torch.float64), _with_kernel())
    with pytest.raises(ValueError, match="got torch.float32 on meta"):
        resolve_backend("cpu", torch.empty(3, device="meta"), _with_kernel())
    with pytest.raises(RuntimeError, match="my_op: the CPU kernel did not build"):
        resolve_backend("cpu", torch.randn(3), _with_kernel(usable=False))
    assert resolve_backend("cpu", torch.randn(3), _with_kernel()) == "cpu"


def test_explicit_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="my_op: backend='triton' got CPU tensors; set "
                                           "TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.randn(3), "my_op")


def test_the_cpp_kernel_stays_the_choice_inside_torch_compile():
    op = _with_kernel()

    def choice(x):  # the choice, read back as a number from the compiled graph
        return x + (1.0 if resolve_backend("auto", x, op) == "cpu" else 0.0)

    x = torch.zeros(3)
    assert torch.compile(choice, fullgraph=True)(x).eq(1.0).all()


def test_decode_attention_auto_takes_its_kernel_as_before(monkeypatch):
    # the module (zoo.kernels' attribute of that name is the function)
    op = importlib.import_module("zoo.kernels.decode_attention")
    q, keys_t, values = torch.randn(1, 2, 8), torch.randn(1, 1, 8, 5), torch.randn(1, 1, 5, 8)
    taken = []
    monkeypatch.setattr(op, "_cpu_kernel_available", lambda: True)
    monkeypatch.setattr(op.cpu, "decode_attention_cpu",
                        lambda *args: taken.append("cpu") or torch.zeros(1, 2, 8))
    decode_attention(q, keys_t, values)
    decode_attention(q.double(), keys_t.double(), values.double())
    decode_attention(q.requires_grad_(), keys_t, values)
    assert taken == ["cpu"]


@pytest.mark.gpu
def test_auto_takes_triton_on_cuda_outside_torch_compile_only():
    op = OpBackends("my_op")
    x = torch.zeros(3, device="cuda")
    assert resolve_backend("auto", x, op) == "triton"

    def choice(x):
        return x + (1.0 if resolve_backend("auto", x, op) == "triton" else 0.0)

    assert torch.compile(choice, fullgraph=True)(x).eq(0.0).all()
    # the C++ kernel is for CPU tensors only
    assert resolve_backend("auto", x, _with_kernel()) == "triton"
