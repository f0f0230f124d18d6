import pytest
import torch

from zoo.kernels import rms_norm
from zoo.testing import assert_close


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 7, 48), (3, 65, 100)])
def test_matches_reference_forward_and_backward(backend, shape):
    x = torch.randn(*shape).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1])).requires_grad_()
    dy = torch.randn(*shape)
    ref = rms_norm(x.double(), w.double(), 1e-5, backend="reference")
    (ref * dy.double()).sum().backward()
    ref_dx, ref_dw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    y = rms_norm(x, w, 1e-5, backend=backend)
    (y * dy).sum().backward()
    assert_close("y", ref, y, 1e-6)
    assert_close("dx", ref_dx, x.grad, 1e-5)
    assert_close("dw", ref_dw, w.grad, 1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_close_to_reference(backend):
    x = torch.randn(2, 9, 64)
    w = 1 + 0.1 * torch.randn(64)
    ref = rms_norm(x.double(), w.double(), backend="reference")
    y = rms_norm(x.bfloat16(), w.bfloat16(), backend=backend)
    assert y.dtype == torch.bfloat16
    assert_close("y_bf16", ref, y, 2e-2)


def test_fp32_equals_transformers_llama_rms_norm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(32, eps=1e-5)
    with torch.no_grad():
        hf.weight.normal_()
    x = torch.randn(3, 5, 32)
    assert torch.equal(hf(x), rms_norm(x, hf.weight, 1e-5, backend="torch"))


def test_weight_shape_is_checked():
    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.randn(2, 3, 8), torch.ones(7))
