"""The compiled decode loop on a GPU, token for token against eager decoding."""

import pytest
import torch

import zoo
from zoo.infer import generate

TINY = [name for name in zoo.shipped_configs() if name.endswith("-tiny")]


@pytest.mark.gpu
@pytest.mark.parametrize("name", TINY)
def test_compiled_cuda_step_decodes_as_eager(name):
    torch.manual_seed(0)
    model = zoo.ZooForCausalLM(zoo.load_config(name)).cuda().eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (37, 300, 5)]
    eager = generate(model, prompts, max_new_tokens=48).tokens
    assert generate(model, prompts, max_new_tokens=48, compile=True).tokens == eager
    # the second run reuses the compiled step
    assert generate(model, prompts, max_new_tokens=48, compile=True).tokens == eager
