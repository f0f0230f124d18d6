"""Helpers shared by zoo's tests and by anyone testing a new op or mixer against zoo's contract."""

from __future__ import annotations

import torch


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    """max |reference - other| / max(|reference|), in float64; 0 when both are zero."""
    ref, got = reference.detach().double(), other.detach().double()
    scale = ref.abs().max().item()
    err = (ref - got).abs().max().item()
    return err / scale if scale > 0 else err


def assert_close(name: str, reference: torch.Tensor, other: torch.Tensor, ratio: float) -> None:
    """Fail with the tensor's name unless max abs error <= ratio * max |reference|."""
    assert reference.shape == other.shape, (
        f"{name}: shape {tuple(other.shape)} != reference {tuple(reference.shape)}"
    )
    assert torch.isfinite(other).all(), f"{name}: non-finite values"
    err = relative_error(reference, other)
    assert err <= ratio, f"{name}: relative error {err:.3e} > {ratio:.1e}"


def seeded_model(name: str = "attention-tiny", seed: int = 0):
    """A shipped config's model in eval mode, its weights drawn after `torch.manual_seed(seed)`."""
    from zoo.config import load_config
    from zoo.model import ZooForCausalLM

    torch.manual_seed(seed)
    return ZooForCausalLM(load_config(name)).eval()


def random_tokens(batch: int = 4, length: int = 48, seed: int = 1, vocab: int = 256
                  ) -> torch.Tensor:
    """(batch, length) token ids, uniform below `vocab`, from their own generator."""
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def linear_input_hessians(model, layers, tokens: torch.Tensor):
    """The input Hessians (zoo.compression.calibration.InputHessians) of `layers`, a list of
    (name, nn.Linear), from one plain forward pass of `model`'s backbone over `tokens`: the
    statistics GPTQ and SparseGPT read, collected without their block-by-block machinery."""
    from zoo.compression.calibration import InputHessians

    hessians = InputHessians()
    handles = [linear.register_forward_pre_hook(
        lambda module, args, name=name: hessians.add(name, args[0].reshape(
            -1, args[0].shape[-1]))) for name, linear in layers]
    model.model(tokens)
    for handle in handles:
        handle.remove()
    return hessians


def correlated_inputs(rows: int, width: int, seed: int) -> torch.Tensor:
    """(rows, width) float64 whose channels are mixed (correlated) and unevenly scaled: the
    calibration inputs on which a Hessian-aware method (GPTQ, SparseGPT) should beat a
    Hessian-blind one."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, width, generator=generator, dtype=torch.float64)
    mixing = torch.randn(width, width, generator=generator, dtype=torch.float64) / width ** 0.5
    scales = torch.rand(width, generator=generator, dtype=torch.float64) + 0.2
    return (z @ mixing + 0.3 * z) * scales
