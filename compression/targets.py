"""Which linear layers compression touches, and the error that names a compression option.

Quantisation and pruning take every `nn.Linear` of the mixers and FFNs (pruning leaves the output
head dense, as Wanda and SparseGPT do; quantisation takes it too), except what stays float by
rule:
- Hyena's implicit filter network (`filter_ffn`): kept float32 by design (layers/hyena.py: sine
  activations of tens of radians that low precision rounds).
- A mixture of experts' router (`gate`, `shared_expert_gate`): which experts a token reaches
  turns on score margins; the router is a sliver of the weights.
The MoE experts themselves are stacked (E, I, D) tensors, not linear layers: they stay float.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

from torch import nn

from zoo.layers.moe import MoE

# Router children of a MoE FFN, which stay float (see the module doc).
ROUTER_NAMES = ("gate", "shared_expert_gate")
FILTER_NETWORK = "filter_ffn"


class CompressionError(ValueError):
    """A compression option that does not fit this model; `option` names the argument
    (weights, group_size, sparsity, method, calibration, skip) and `value` what it was."""

    def __init__(self, option: str, value: Any, detail: str):
        self.option, self.value, self.detail = option, value, detail
        super().__init__(f"{option}={value!r}: {detail}")


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output head (transformers' get_output_embeddings), or None."""
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def _kept_float_by_rule(name: str, parents: dict[str, nn.Module]) -> bool:
    parent_name, _, child = name.rpartition(".")
    if FILTER_NETWORK in name.split("."):
        return True
    return isinstance(parents.get(parent_name), MoE) and child in ROUTER_NAMES


def linear_targets(model: nn.Module, skip: Iterable[str] = (), include_head: bool = True
                   ) -> list[tuple[str, nn.Linear]]:
    """(qualified name, module) of every nn.Linear compression takes, in model order: all but
    those kept float by rule (module doc), the output head unless `include_head`, and names
    matching a `skip` glob ("*.dt_proj", "model.layers.0.*"). A skip pattern that matches no
    linear layer is a CompressionError (a typo would otherwise compress what it meant to keep).
    """
    skip = list(skip)
    modules = dict(model.named_modules())
    head = output_head(model)
    linears = [(name, m) for name, m in modules.items() if isinstance(m, nn.Linear)]
    for pattern in skip:
        if not any(fnmatch.fnmatchcase(name, pattern) for name, _ in linears):
            raise CompressionError("skip", pattern, "matches no linear layer of the model "
                                   "(names look like model.layers.0.mixer.q_proj)")
    chosen = []
    for name, module in linears:
        if _kept_float_by_rule(name, modules):
            continue
        if module is head and not include_head:
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in skip):
            continue
        chosen.append((name, module))
    return chosen


def quantization_targets(model: nn.Module, skip: Iterable[str], weights: str
                         ) -> list[tuple[str, nn.Linear]]:
    """`linear_targets` for quantising to `weights`: a CompressionError naming the option when
    the model is quantised already or has no linear layer to quantise."""
    config = getattr(model, "config", None)
    if getattr(config, "quantization", None):
        raise CompressionError("weights", weights, "the model is quantised already "
                               f"({config.quantization['weights']}); quantise the float model")
    targets = linear_targets(model, skip)
    if not targets:
        raise CompressionError("weights", weights, "the model has no linear layer to quantise")
    return targets


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
