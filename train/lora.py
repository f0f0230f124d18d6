"""Low-rank adapters (LoRA, Hu et al. 2021) on a zoo model's projections, through `peft`.

    spec = LoraSpec(rank=8, alpha=16.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    names = add_lora(student, spec, layers=report.replaced)   # the adapters' parameter names
    ...train...
    merge_lora(student)        # a plain ZooForCausalLM again: original state-dict keys

LoLCATs (Zhang et al. 2024) trains only such adapters in its end-to-end stage; distillation's
stage 2 uses them when the run config sets `distill.lora` (`zoo.train.distill`).

peft's `inject_adapter_in_model` is used rather than `get_peft_model`: it wraps the targeted
modules in place and returns the same ZooForCausalLM, whereas a PeftModel would wrap the whole
model under `base_model.model.*` names that the Distiller's loop, checkpoints, `generate` and
every `isinstance(model, ZooForCausalLM)` check would have to see through. zoo's `Linear` is an
`nn.Linear` subclass, so peft wraps it as the base layer of a `lora.Linear` and still calls its
own forward (the few-row CPU product) before adding the low-rank term.

While adapters are in, the wrapped projections are no longer `nn.Linear` instances and their
state-dict names gain `.base_layer.` and `.lora_A.default.` / `.lora_B.default.`; paths that read
weights directly (the native C++ decode step) see only the base weights, so decode after
`merge_lora`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# The decoder layers' module list in a ZooForCausalLM ("model.layers.<i>."): what peft's
# layers_to_transform counts in.
LAYERS_PATTERN = "layers"


@dataclasses.dataclass
class LoraSpec:
    """What to adapt and how: rank r, scale alpha / r, dropout on the adapter's input, the
    projection names (as the layers name them: q_proj ... o_proj, and the FFN's gate_proj,
    up_proj, down_proj or fc_in, fc_out), and the layers (None: the caller's default set)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Sequence[str] = ATTENTION_TARGETS
    layers: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            _fail("rank", self.rank, "must be a positive integer")
        if not _is_number(self.alpha) or self.alpha <= 0:
            _fail("alpha", self.alpha, "must be a number > 0")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            _fail("dropout", self.dropout, "must be a number in [0, 1)")
        # A bare string would be read by peft as a regular expression, not a module name.
        if (isinstance(self.targets, str) or not isinstance(self.targets, Iterable)
                or not list(self.targets)):
            _fail("targets", self.targets,
                  f"must be a non-empty list of module names, e.g. {list(ATTENTION_TARGETS)}")
        for name in self.targets:
            if not isinstance(name, str) or not name or "." in name:
                _fail("targets", self.targets,
                      f"entry {name!r} must be a module name without dots, e.g. 'q_proj'")
        self.targets = tuple(dict.fromkeys(self.targets))
        if self.layers is not None:
            if isinstance(self.layers, str) or not isinstance(self.layers, Iterable):
                _fail("layers", self.layers, "must be null (the default layers) or a list of "
                      "layer indices")
            for index in self.layers:
                if not isinstance(index, int) or isinstance(index, bool):
                    _fail("layers", self.layers, f"entry {index!r} must be a layer index")
            if not list(self.layers):
                _fail("layers", self.layers, "must name at least one layer (null: the default "
                      "layers)")
            self.layers = tuple(self.layers)
        self.alpha = float(self.alpha)
        self.dropout = float(self.dropout)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraSpec:
        """A validated spec from a run config's mapping; unknown keys are refused by name."""
        if not isinstance(data, Mapping):
            raise ValueError(f"lora={data!r} must be a mapping with fields "
                             f"{', '.join(f.name for f in dataclasses.fields(cls))}, or null")
        allowed = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in allowed:
                raise ValueError(f"lora.{key}={data[key]!r} is not a field; allowed: "
                                 f"{', '.join(allowed)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "targets": list(self.targets),
                "layers": None if self.layers is None else list(self.layers)}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"lora.{field}={value!r} {allowed}")


def _resolve_layers(spec: LoraSpec, default: Iterable[int] | None, n_layers: int) -> list[int]:
    chosen = spec.layers if spec.layers is not None else default
    if chosen is None:
        return list(range(n_layers))
    resolved = []
    for index in chosen:
        i = index + n_layers if index < 0 else index
        if not 0 <= i < n_layers:
            _fail("layers", list(chosen), f"entry {index} is outside 0..{n_layers - 1} "
                  "(n_layers)")
        resolved.append(i)
    if not resolved:
        _fail("layers", list(chosen), "leaves no layer to adapt")
    return sorted(set(resolved))


def tuner_layers(model: nn.Module) -> list[tuple[str, BaseTunerLayer]]:
    """The peft-wrapped modules of `model`, by name (empty when it holds no adapters)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def adapter_parameter_names(model: nn.Module) -> list[str]:
    """Names of the adapters' parameters (lora_A, lora_B), in named_parameters order."""
    names = set()
    for prefix, module in tuner_layers(model):
        base = {id(p) for p in module.get_base_layer().parameters()}
        names.update(f"{prefix}.{n}" for n, p in module.named_parameters() if id(p) not in base)
    return [n for n, _ in model.named_parameters() if n in names]


def adapted_base_parameter_names(model: nn.Module) -> list[str]:
    """Names of the wrapped layers' own weights (what the adapters stand in for in training)."""
    names = set()
    for prefix, module in tuner_layers(model):
        base = {id(p) for p in module.get_base_layer().parameters()}
        names.update(f"{prefix}.{n}" for n, p in module.named_parameters() if id(p) in base)
    return [n for n, _ in model.named_parameters() if n in names]


def check_lora(model: nn.Module, spec: LoraSpec, layers: Iterable[int] | None = None
               ) -> list[int]:
    """The layers add_lora would adapt, after checking that every target is a linear
    projection there; injects nothing (a run checks its spec before spending stage 1)."""
    if tuner_layers(model):
        raise ValueError("add_lora: the model already holds LoRA adapters; merge_lora first")
    n_layers = getattr(getattr(model, "config", None), "n_layers", None)
    if not isinstance(n_layers, int) or not hasattr(model, "model"):
        raise ValueError(f"add_lora: model={type(model).__name__} is not a zoo model "
                         "(config.n_layers and model.layers are missing)")
    chosen = _resolve_layers(spec, layers, n_layers)
    stack = model.model.layers
    available = sorted({name.rpartition(".")[2] for i in chosen
                        for name, m in stack[i].named_modules() if isinstance(m, nn.Linear)})
    for target in spec.targets:
        if target not in available:
            _fail("targets", list(spec.targets),
                  f"entry {target!r} is not a linear projection of layers {chosen}; allowed: "
                  f"{', '.join(available)}")
    return chosen


def add_lora(model: nn.Module, spec: LoraSpec, layers: Iterable[int] | None = None, *,
             freeze: bool = True) -> list[str]:
    """Wrap spec.targets in spec.layers (or `layers` when spec.layers is None; every layer when
    both are None) with LoRA adapters, in place; returns the adapters' parameter names.

    With B initialised to zero the model's outputs are unchanged. freeze=True leaves only the
    adapters trainable; freeze=False leaves every other parameter's requires_grad as it was.
    """
    chosen = check_lora(model, spec, layers)
    before = {id(p): p.requires_grad for p in model.parameters()}
    lora_config = LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
        target_modules=list(spec.targets), layers_to_transform=chosen,
        layers_pattern=LAYERS_PATTERN, bias="none")
    inject_adapter_in_model(lora_config, model)
    if not freeze:
        # peft marks only the adapters trainable; the caller asked to keep its own choice
        for p in model.parameters():
            if id(p) in before:
                p.requires_grad_(before[id(p)])
    return adapter_parameter_names(model)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W + B A alpha / r) and put the base layer back
    in its place: the model's state-dict keys are the original ones again, every parameter is
    trainable as in a freshly loaded model, and the same model object is returned."""
    wrapped = tuner_layers(model)
    if not wrapped:
        raise ValueError("merge_lora: the model holds no LoRA adapters (add_lora adds them)")
    for name, module in wrapped:
        module.merge(safe_merge=True)  # safe_merge refuses weights that became NaN or inf
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module.get_base_layer())
    if hasattr(model, "peft_config"):  # inject_adapter_in_model's record of the adapters
        del model.peft_config
    for p in model.parameters():
        p.requires_grad_(True)
    return model


__all__ = ["LoraSpec", "add_lora", "adapted_base_parameter_names", "adapter_parameter_names",
           "check_lora", "merge_lora", "tuner_layers"]
