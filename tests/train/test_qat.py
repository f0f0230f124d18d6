"""Quantisation-aware training (zoo.compression.qat, `--set quant=int4`): the fake-quantised
forward equals the dequantised weights quantize_model stores, the backward is the straight-through
estimator, and a short run trains a model whose exported int4 twin computes the same loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from zoo.compression import CompressionError, QuantizedLinear, linear_targets, quantize_model
from zoo.compression.qat import FakeQuantLinear, fake_quantize, fake_quantize_model
from zoo.train import Trainer
from zoo.train.config import RunConfigError, from_dict, load_run_config
from zoo.train.metrics import train_losses

FORMATS = [("int8", None), ("int4", 32), ("int4", 64)]


def _linear(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(128, 48, dtype=dtype)
    with torch.no_grad():  # rows of very different ranges, one with an exact zero
        linear.weight.mul_(torch.logspace(-2, 1, 48, dtype=dtype)[:, None])
        linear.weight[3, 5] = 0.0
    return linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weights,group_size", FORMATS)
def test_fake_quantized_weight_is_what_quantize_model_stores(weights, group_size, dtype):
    linear = _linear(dtype=dtype)
    stored = QuantizedLinear.from_linear(linear, weights, group_size).dequantize(dtype)
    assert torch.equal(fake_quantize(linear.weight, weights, group_size), stored)
    assert not torch.equal(stored, linear.weight)  # the test would see a no-op


@pytest.mark.parametrize("weights,group_size", FORMATS)
def test_forward_equals_the_dequantised_reference(weights, group_size):
    linear = _linear()
    reference = F.linear(x := torch.randn(2, 5, 128),
                         QuantizedLinear.from_linear(linear, weights, group_size).dequantize(),
                         linear.bias)
    model = nn.Sequential(linear)
    fake_quantize_model(model, weights, group_size)
    assert isinstance(model[0], FakeQuantLinear) and model[0].weight is linear.weight
    assert torch.equal(model(x), reference)


@pytest.mark.parametrize("weights,group_size", FORMATS)
def test_backward_is_the_straight_through_estimator(weights, group_size):
    """The float weight's gradient is the one a float layer holding the fake-quantised weight
    gets (rounding's derivative taken as 1); the input's is that layer's too."""
    linear = _linear()
    at_quantised = nn.Linear(128, 48)
    with torch.no_grad():
        at_quantised.weight.copy_(fake_quantize(linear.weight, weights, group_size))
        at_quantised.bias.copy_(linear.bias)
    x = torch.randn(4, 128)
    upstream = torch.randn(4, 48)
    x_reference = x.clone().requires_grad_()
    (at_quantised(x_reference) * upstream).sum().backward()
    model = nn.Sequential(linear)
    fake_quantize_model(model, weights, group_size)
    x_fake = x.clone().requires_grad_()
    (model(x_fake) * upstream).sum().backward()
    assert torch.equal(linear.weight.grad, at_quantised.weight.grad)
    assert torch.equal(linear.bias.grad, at_quantised.bias.grad)
    assert torch.equal(x_fake.grad, x_reference.grad)


def test_fake_quantize_model_takes_quantize_models_layers_and_keeps_a_tied_head_tied():
    torch.manual_seed(0)
    model = zoo.ZooForCausalLM(zoo.load_config("attention-tiny"))
    names = [name for name, _ in linear_targets(model)]
    section = fake_quantize_model(model, "int4", 32)
    assert section["modules"] == names
    assert all(isinstance(model.get_submodule(name), FakeQuantLinear) for name in names)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert set(model.state_dict()) == set(zoo.ZooForCausalLM(model.config).state_dict())


def test_fake_quantize_model_refuses_what_quantize_model_refuses():
    model = nn.Sequential(nn.Linear(96, 8))
    with pytest.raises(CompressionError, match="group_size=64: does not divide the input "
                       "width 96 of 0"):
        fake_quantize_model(model, "int4", 64)
    with pytest.raises(CompressionError, match="weights='int3'"):
        fake_quantize_model(model, "int3")


def _qat_run(out_dir, **fields) -> dict:
    return {
        "name": "qat", "out_dir": str(out_dir), "model": "attention-tiny",
        "data": {"source": "mqar", "vocab_size": 32, "num_kv_pairs": 4},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "train": {"steps": 25, "batch_size": 8, "seq_len": 32, "eval_interval": 0,
                  "eval_batches": 2, "threads": 1},
        "checkpoint": {"interval": 0}, **fields,
    }


def test_int4_training_lowers_the_loss_and_exports_to_the_same_loss(tmp_path):
    trainer = Trainer(from_dict(_qat_run(tmp_path, quant="int4")).check(), progress=False)
    try:
        summary = trainer.fit()
        ids, labels = trainer.dataset.val_batch(list(range(8)))
        trainer.model.eval()
        with torch.no_grad():
            qat_logits = trainer.model(input_ids=ids).logits
    finally:
        trainer.close()
    losses = train_losses(tmp_path)
    assert sum(losses[s] for s in (21, 22, 23, 24, 25)) < sum(losses[s] for s in (1, 2, 3, 4, 5))
    assert isinstance(trainer.model.model.layers[0].mixer.q_proj, FakeQuantLinear)
    exported = zoo.ZooForCausalLM.from_pretrained(summary["final"]).eval()
    assert type(exported.model.layers[0].mixer.q_proj) is not FakeQuantLinear  # a float folder
    quantize_model(exported, "int4", 32)
    with torch.no_grad():
        exported_logits = exported(input_ids=ids).logits
    torch.testing.assert_close(exported_logits, qat_logits, rtol=1e-5, atol=1e-5)
    loss = F.cross_entropy(exported_logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                           ignore_index=-100)
    qat_loss = F.cross_entropy(qat_logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                               ignore_index=-100)
    assert float(loss) == pytest.approx(float(qat_loss), rel=1e-5)


@pytest.mark.parametrize("assignment,message", [
    ("quant=int5", "quant='int5' is not one of none, int8, int4"),
    ("quant_group_size=48", "quant_group_size=48 is not one of 32, 64, 128"),
])
def test_a_bad_quant_setting_names_the_field_and_the_allowed_values(assignment, message):
    with pytest.raises(RunConfigError, match=message):
        load_run_config(None, [assignment])


def test_a_group_size_that_does_not_divide_a_layer_names_the_setting(tmp_path):
    run = from_dict(_qat_run(tmp_path, quant="int4", quant_group_size=128)).check()
    with pytest.raises(RunConfigError, match="quant='int4', quant_group_size=128: does not "
                       "divide the input width 64"):
        Trainer(run, progress=False)
