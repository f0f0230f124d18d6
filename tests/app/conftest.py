"""Shared set-up of the application tests: tiny untrained models by config name."""

import pytest
import torch

import zoo


@pytest.fixture
def make_model():
    def make(name: str, seed: int = 0) -> zoo.ZooForCausalLM:
        torch.manual_seed(seed)
        return zoo.ZooForCausalLM(zoo.load_config(name)).eval()

    return make
