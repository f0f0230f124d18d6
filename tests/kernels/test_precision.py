import pytest
import torch

from zoo.kernels import compute_dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_everything_but_float64_computes_in_float32(dtype):
    assert compute_dtype(dtype) == torch.float32


def test_float64_stays_float64():
    assert compute_dtype(torch.float64) == torch.float64
