"""zoo.train.lora: adapters through peft leave a zoo model a ZooForCausalLM, start as a no-op,
train alone, and merge back into a plain model with the original state-dict keys."""

from __future__ import annotations

import pytest
import torch

import zoo
from zoo.layers.linear import Linear
from zoo.testing import relative_error
from zoo.train.linearize import linearize
from zoo.train.lora import (
    LoraSpec,
    adapted_base_parameter_names,
    adapter_parameter_names,
    add_lora,
    merge_lora,
    tuner_layers,
)

HEDGEHOG = {"type": "linear_attention", "feature_map": "hedgehog"}


def _student(n_layers: int = 3, keep: tuple[int, ...] = (1,)) -> zoo.ZooForCausalLM:
    """A linearised student (layer 1 kept as attention) of a random attention teacher."""
    torch.manual_seed(0)
    config = zoo.load_config("attention-tiny", n_layers=n_layers, vocab_size=256)
    return linearize(zoo.ZooForCausalLM(config).eval(), HEDGEHOG, keep_attention=list(keep))


def _ids(n: int = 2, t: int = 17, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def _train(model: torch.nn.Module, steps: int = 3) -> None:
    """A few AdamW steps on next-token loss over whatever is trainable."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        ids = _ids(seed=10 + step)
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@torch.no_grad()
def test_adapters_at_init_change_nothing_and_wrap_zoo_linear(monkeypatch):
    student = _student()
    ids = _ids()
    before = student(ids).logits
    names = add_lora(student, LoraSpec(rank=4), layers=student.linearization.replaced)
    # the model is still the same ZooForCausalLM, adapted on the replaced layers only
    assert isinstance(student, zoo.ZooForCausalLM) and hasattr(student, "generate")
    assert sorted({n.split(".")[2] for n in names}) == ["0", "2"]
    assert len(names) == 2 * 4 * 2  # lora_A and lora_B on q/k/v/o of two layers
    wrapped = dict(tuner_layers(student))
    assert set(wrapped) == {f"model.layers.{i}.mixer.{p}" for i in (0, 2)
                            for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    for module in wrapped.values():
        assert type(module.get_base_layer()) is Linear
    # B starts at zero: the logits are the base model's, bit for bit
    assert torch.equal(student(ids).logits, before)
    # the wrapped layer still runs zoo's Linear.forward (its few-row CPU product)
    calls = []
    forward = Linear.forward

    def spy(self, x):
        calls.append(self)
        return forward(self, x)

    monkeypatch.setattr(Linear, "forward", spy)
    student(ids)
    bases = {id(m.get_base_layer()) for m in wrapped.values()}
    assert bases <= {id(m) for m in calls}


def test_only_the_adapters_train():
    student = _student()
    names = add_lora(student, LoraSpec(rank=4, dropout=0.1), layers=[0, 2])
    assert [n for n, p in student.named_parameters() if p.requires_grad] == names
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if n not in names}
    adapters = {n: p.detach().clone() for n, p in student.named_parameters() if n in names}
    _train(student, steps=3)  # B moves first (A's gradient is zero while B is), then A
    params = dict(student.named_parameters())
    for name, value in frozen.items():
        assert torch.equal(params[name], value), name
    for name, value in adapters.items():
        assert not torch.equal(params[name], value), name
    # the adapted projections' own weights are frozen, by name
    base = adapted_base_parameter_names(student)
    assert len(base) == 8 and all(".base_layer." in n for n in base)


def test_freeze_false_keeps_the_callers_trainable_set():
    student = _student()
    student.model.embed_tokens.weight.requires_grad_(False)
    names = add_lora(student, LoraSpec(rank=2, targets=["q_proj"]), freeze=False)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert set(names) <= trainable
    assert "model.embed_tokens.weight" not in trainable
    assert "model.layers.0.mixer.q_proj.base_layer.weight" in trainable
    assert len(names) == 2 * 3  # every layer (kept attention too) when no layers are given


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def test_merge_gives_identical_logits_and_the_original_keys(tmp_path):
    student = _student()
    keys = list(student.state_dict())
    add_lora(student, LoraSpec(rank=4, alpha=8.0,
                               targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                        "up_proj", "down_proj"]),
             layers=student.linearization.replaced)
    _train(student, steps=4)
    ids = _ids(t=29)
    adapted = _logits(student, ids)
    merged = merge_lora(student)
    assert merged is student and isinstance(merged, zoo.ZooForCausalLM)
    assert relative_error(_logits(merged, ids), adapted) < 1e-6
    assert list(merged.state_dict()) == keys  # no base_layer, lora_A, lora_B
    assert not tuner_layers(merged) and not adapter_parameter_names(merged)
    assert not hasattr(merged, "peft_config")
    assert all(p.requires_grad for p in merged.parameters())
    assert type(merged.model.layers[0].mixer.q_proj) is Linear
    # a plain zoo model: saved and loaded as one
    merged.save_pretrained(tmp_path / "merged")
    loaded = zoo.ZooForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.equal(_logits(loaded, ids), _logits(merged, ids))
    # and it can be adapted again
    assert add_lora(merged, LoraSpec(rank=2))


@torch.no_grad()
def test_decoding_through_the_cache_with_adapters_in():
    """The recurrent path (prefill, then one token at a time) goes through the adapters as the
    full forward does, and generate() runs on the adapted model as on the merged one."""
    from zoo.infer import generate

    student = _student()
    add_lora(student, LoraSpec(rank=4), layers=[0, 2])
    for name, p in student.named_parameters():
        if "lora_B" in name:
            p.normal_(std=0.05)
    ids = _ids(n=1, t=12)
    full = student(ids, use_cache=False).logits
    out = student(input_ids=ids[:, :8], use_cache=True)
    steps = [out.logits]
    for t in range(8, 12):
        out = student(input_ids=ids[:, t:t + 1], cache=out.cache, use_cache=True)
        steps.append(out.logits)
    assert relative_error(torch.cat(steps, dim=1), full) < 1e-4
    adapted = generate(student, [ids[0, :8].tolist()], max_new_tokens=6).tokens
    merge_lora(student)
    assert generate(student, [ids[0, :8].tolist()], max_new_tokens=6).tokens == adapted


@pytest.mark.parametrize("fields,field", [
    ({"rank": 0}, "lora.rank"),
    ({"rank": 2.5}, "lora.rank"),
    ({"rank": True}, "lora.rank"),
    ({"alpha": 0}, "lora.alpha"),
    ({"alpha": "big"}, "lora.alpha"),
    ({"dropout": 1.0}, "lora.dropout"),
    ({"dropout": -0.1}, "lora.dropout"),
    ({"targets": "q_proj"}, "lora.targets"),
    ({"targets": []}, "lora.targets"),
    ({"targets": ["mixer.q_proj"]}, "lora.targets"),
    ({"layers": []}, "lora.layers"),
    ({"layers": ["0"]}, "lora.layers"),
    ({"rnak": 4}, "lora.rnak"),
])
def test_bad_spec_fields_are_named(fields, field):
    with pytest.raises(ValueError, match=field):
        LoraSpec.from_dict(fields)


def test_bad_targets_and_layers_are_named_against_the_model():
    student = _student()
    with pytest.raises(ValueError, match=r"lora.targets.*'wq'.*allowed: .*q_proj"):
        add_lora(student, LoraSpec(targets=["wq"]))
    with pytest.raises(ValueError, match=r"lora.layers.*entry 3 is outside 0..2"):
        add_lora(student, LoraSpec(layers=[3]))
    with pytest.raises(ValueError, match="holds no LoRA adapters"):
        merge_lora(student)
    assert not tuner_layers(student)  # a refused spec injects nothing
    add_lora(student, LoraSpec(layers=[-1]))
    assert {n.split(".")[2] for n in adapter_parameter_names(student)} == {"2"}
    with pytest.raises(ValueError, match="already holds LoRA adapters"):
        add_lora(student, LoraSpec())
