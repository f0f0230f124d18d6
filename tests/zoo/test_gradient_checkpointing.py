"""Gradient checkpointing through transformers' switch: `model.gradient_checkpointing_enable()`
works for every shipped config, recomputes every block in the backward pass, and gives the loss
and the gradients of the model without it (peft's LoRA on top included)."""

import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model

import zoo
from zoo.testing import assert_close

TINY = [name for name in zoo.shipped_configs() if name.endswith("-tiny")]


def _enable(model, **kwargs) -> None:
    # transformers 5 renamed it activation_checkpointing_enable and warns on the old name,
    # which is the one Trainer, peft and most recipes still call
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(**kwargs)


def _batch(vocab_size: int, B: int = 2, T: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab_size, (B, T), generator=torch.Generator().manual_seed(5))


def _loss_and_grads(model, ids) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)  # the same dropout / router jitter draws in both runs
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()
             if p.requires_grad and p.grad is not None}
    return loss.detach(), grads


def _count_mixer_calls(model) -> list[int]:
    # a pre-hook: a recompute stops early once it has every saved tensor back (torch's
    # checkpoint early stop), possibly before a mixer returns, never before it starts
    calls = [0]
    for block in model.model.layers:
        block.mixer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("name", zoo.shipped_configs())
def test_every_shipped_config_enables_it(name):
    with torch.device("meta"):
        model = zoo.ZooForCausalLM(zoo.load_config(name))
    _enable(model)
    assert all(block.gradient_checkpointing for block in model.model.layers)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("name", TINY)
def test_checkpointed_loss_and_gradients_equal_the_plain_ones(name, reentrant):
    torch.manual_seed(0)
    model = zoo.ZooForCausalLM(zoo.load_config(name)).train()
    ids = _batch(model.config.vocab_size)
    calls = _count_mixer_calls(model)
    loss, grads = _loss_and_grads(model, ids)
    assert calls[0] == model.config.n_layers

    _enable(model, gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    calls[0] = 0
    checkpointed_loss, checkpointed_grads = _loss_and_grads(model, ids)
    # every block ran twice: once forward, once recomputed in the backward pass
    assert calls[0] == 2 * model.config.n_layers
    assert_close("loss", loss, checkpointed_loss, 1e-6)
    assert grads.keys() == checkpointed_grads.keys()
    for param, grad in grads.items():
        assert_close(param, grad, checkpointed_grads[param], 1e-5)


def test_a_cached_forward_in_training_is_not_recomputed():
    # a recompute would write the in-place KV cache a second time: such calls run plainly
    torch.manual_seed(0)
    model = zoo.ZooForCausalLM(zoo.load_config("attention-tiny")).train()
    _enable(model)
    ids = _batch(model.config.vocab_size, T=8)
    calls = _count_mixer_calls(model)
    out = model(ids, use_cache=True)
    out.logits.sum().backward()
    assert calls[0] == model.config.n_layers
    assert out.cache.seen_tokens == 8
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(ids, use_cache=False).logits, out.logits)


def test_peft_lora_trains_the_same_with_checkpointing():
    torch.manual_seed(0)
    base = zoo.ZooForCausalLM(zoo.load_config("attention-tiny")).train()
    # init_lora_weights=False: B starts non-zero, so every adapter gets a non-zero gradient
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                      init_lora_weights=False)
    model = get_peft_model(base, lora)
    ids = _batch(base.config.vocab_size)
    loss, grads = _loss_and_grads(model, ids)
    assert grads and all("lora_" in name for name in grads)
    assert all(grad.abs().sum() > 0 for grad in grads.values())

    _enable(model)
    calls = _count_mixer_calls(base)
    checkpointed_loss, checkpointed_grads = _loss_and_grads(model, ids)
    assert calls[0] == 2 * base.config.n_layers
    assert_close("loss", loss, checkpointed_loss, 1e-6)
    assert grads.keys() == checkpointed_grads.keys()
    for param, grad in grads.items():
        assert_close(param, grad, checkpointed_grads[param], 1e-5)
