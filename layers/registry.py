"""Name -> class registries for mixers and FFNs, and the builders that read a config spec.

A spec is plain data: {"type": "attention", "n_heads": 8, ...}. Every option is checked before
anything is built: its type from the constructor's annotation (an int option takes no bool and
no float, a float option takes an int, no option takes NaN), its range or its choices from the
tables below, looked up by the option's name, so a new mixer whose options reuse these names is
checked without code. Unknown types, unknown options and values out of range are errors that
name the option's path and what is allowed: `config.mixer.n_heads=-4 must be an integer >= 1 or
null (mixer 'attention')`. What depends on several options or on d_model (divisibility, top_k
<= n_experts) stays with the constructors.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

from .base import FFN, Mixer

MIXERS: dict[str, type[Mixer]] = {}
FFNS: dict[str, type[FFN]] = {}


def register_mixer(name: str):
    def add(cls: type[Mixer]) -> type[Mixer]:
        if name in MIXERS:
            raise ValueError(f"mixer {name!r} is registered twice")
        MIXERS[name] = cls
        cls.registry_name = name
        return cls

    return add


def register_ffn(name: str):
    def add(cls: type[FFN]) -> type[FFN]:
        if name in FFNS:
            raise ValueError(f"ffn {name!r} is registered twice")
        FFNS[name] = cls
        cls.registry_name = name
        return cls

    return add


# ---------------------------------------------------------------------------------------------
# what each option accepts


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The range of a numeric option (or of each number of a pair); infinity only if allowed."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    infinite: bool = False

    def admits(self, value: float) -> bool:
        if isinstance(value, float) and (math.isnan(value) or (
                math.isinf(value) and not self.infinite)):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or value < self.high or (not self.high_open and value == self.high)

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return (f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}" if self.high is not None else ""


SIZE = Bounds(low=1)  # a count of heads, channels, tokens, layers, experts
COUNT = Bounds(low=0)  # a count that may be zero (no extra layers, no shared experts)
POSITIVE = Bounds(low=0, low_open=True)
NON_NEGATIVE = Bounds(low=0)
RATE = Bounds(low=0, high=1, high_open=True)  # a probability or noise level, 0 = off
OPEN_UNIT = Bounds(low=0, high=1, low_open=True, high_open=True)

# The range of every int and float option of every registered mixer and FFN, by name.
OPTION_BOUNDS: dict[str, Bounds] = {
    **dict.fromkeys((
        "n_heads", "n_kv_heads", "head_dim", "head_size", "head_size_divisor", "window",
        "chunk_size", "k_slots", "d_state", "dt_rank", "expand", "n_groups", "order", "max_len",
        "filter_width", "filter_bands", "short_conv_width", "value_factor", "hidden_size",
        "attention_hidden_size", "feature_dim", "mix_lora", "decay_lora", "n_layers",
        "n_experts", "top_k",
    ), SIZE),
    "d_conv": Bounds(low=2),  # the convolution's state holds the d_conv - 1 previous tokens
    # the delta-rule mixers': value heads, the output gate's rank, and d_conv under fla's name
    **dict.fromkeys(("n_value_heads", "gate_lora"), SIZE),
    # RWKV-7's adapter ranks: the in-context learning rate's and the value residual's
    **dict.fromkeys(("iclr_lora", "value_lora"), SIZE),
    "conv_size": Bounds(low=2),
    "filter_depth": COUNT,
    "n_shared_experts": COUNT,
    "shared_expert_hidden_size": SIZE,
    # MLA's low ranks and head sizes (its shared key part may be absent), and the MoE's
    # group-limited routing and scale of the routed experts' weights
    **dict.fromkeys((
        "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim", "n_expert_groups",
        "top_k_groups",
    ), SIZE),
    "qk_rope_head_dim": COUNT,
    "routed_scaling_factor": POSITIVE,
    **dict.fromkeys((
        "rope_theta", "norm_eps", "sine_freq", "decay_fast", "decay_slow", "dt_min", "dt_max",
        "dt_scale", "dt_init_floor", "capacity_factor",
    ), POSITIVE),
    "decay_target": OPEN_UNIT,
    # attention's share of each head that rotates (Qwen3-Next: 0.25); 1 = the whole head
    "partial_rotary_factor": Bounds(low=0, high=1, low_open=True),
    "jitter_noise": RATE,
    "dropout": RATE,
    "aux_loss_coef": NON_NEGATIVE,
    "z_loss_coef": NON_NEGATIVE,
    # pairs [low, high]: each number's bounds; PAIR_ORDER says how low and high compare
    "A_init_range": POSITIVE,
    "dt_limit": Bounds(low=0, infinite=True),
}
PAIR_ORDER: dict[str, str] = {"A_init_range": "<=", "dt_limit": "<"}


def option_choices() -> dict[str, tuple[str, ...]]:
    """The strings each str option accepts, by name (for `int | str` options, the strings)."""
    # Late imports: moe registers itself through this module, so it cannot be imported above.
    from zoo.kernels.backend import BACKENDS

    from .feature_maps import FEATURE_MAPS
    from .moe import EXPERT_TYPES, ROUTER_SCORINGS

    return {"feature_map": FEATURE_MAPS, "expert_type": EXPERT_TYPES, "backend": BACKENDS,
            "dt_init": ("random", "constant"), "dt_rank": ("auto",),
            "router_scoring": ROUTER_SCORINGS}


@dataclasses.dataclass(frozen=True)
class OptionRule:
    """What one option accepts: the kinds its annotation names ("int", "float", "bool", "str",
    "pair", "none") and, for numbers and strings, the declared bounds or choices."""

    kinds: frozenset[str]
    bounds: Bounds | None = None
    choices: tuple[str, ...] = ()
    pair_order: str = "<"

    def admits(self, value: Any) -> bool:
        if value is None:
            return "none" in self.kinds
        if isinstance(value, bool):
            return "bool" in self.kinds
        if isinstance(value, int):
            return bool(self.kinds & {"int", "float"}) and self._in_bounds(value)
        if isinstance(value, float):
            return "float" in self.kinds and self._in_bounds(value)
        if isinstance(value, str):
            return "str" in self.kinds and value in self.choices
        if isinstance(value, (list, tuple)):
            return "pair" in self.kinds and self._is_pair(value)
        return False

    def _in_bounds(self, value: float) -> bool:
        return self.bounds is None or self.bounds.admits(value)

    def _is_pair(self, value: list | tuple) -> bool:
        if len(value) != 2 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and self._in_bounds(v)
                for v in value):
            return False
        low, high = value
        return low < high if self.pair_order == "<" else low <= high

    def refusal(self) -> str:
        """What an error says after `option=value`: "is not one of (...)" for a choice,
        "must be an integer >= 1 or null" for the rest."""
        if self.kinds == {"str"}:
            return f"is not one of {self.choices}"
        return f"must be {self.describe()}"

    def describe(self) -> str:
        bounds = f" {self.bounds.describe()}" if self.bounds is not None else ""
        parts = []
        if len(self.choices) > 1:
            parts.append(f"one of {', '.join(map(repr, self.choices))}")
        parts += map(repr, self.choices[:1] if len(self.choices) == 1 else ())
        if "int" in self.kinds:
            parts.append(f"an integer{bounds}")
        if "float" in self.kinds:
            parts.append(f"a finite number{bounds}")
        if "pair" in self.kinds:
            parts.append(f"a pair [low, high] of numbers{bounds} with low {self.pair_order} high")
        if "bool" in self.kinds:
            parts += ["true", "false"]
        if "none" in self.kinds:
            parts.append("null")
        return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} or {parts[-1]}"


def _kinds_of(annotation: Any) -> frozenset[str] | None:
    """The kinds an annotation names, or None for one this module cannot check."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [_kinds_of(a) for a in typing.get_args(annotation)]
        return None if None in members else frozenset().union(*members)
    origin = typing.get_origin(annotation)
    if origin in (list, tuple) and all(a in (int, float) for a in typing.get_args(annotation)):
        return frozenset({"pair"})
    names = {int: "int", float: "float", bool: "bool", str: "str", type(None): "none"}
    return frozenset({names[annotation]}) if annotation in names else None


@functools.cache
def option_rules(cls: type) -> dict[str, OptionRule]:
    """The rule of every keyword option of a mixer or FFN class, from its signature's
    annotations and the tables above; a TypeError names an option neither can describe."""
    rules = {}
    choices = option_choices()
    params = inspect.signature(cls.__init__, eval_str=True).parameters
    for name, param in params.items():
        if name in ("self", "d_model", "layer_idx") or param.kind != param.KEYWORD_ONLY:
            continue
        kinds = _kinds_of(param.annotation)
        if kinds is None:
            raise TypeError(f"{cls.__name__}({name}: {param.annotation}): zoo checks options "
                            "annotated with int, float, bool, str, None, list[float] or unions "
                            "of them")
        rule = OptionRule(kinds, OPTION_BOUNDS.get(name), choices.get(name, ()),
                          PAIR_ORDER.get(name, "<"))
        if kinds & {"int", "float", "pair"} and rule.bounds is None or (
                "str" in kinds and not rule.choices):
            raise TypeError(f"{cls.__name__} option {name!r} has no declared range: add it to "
                            "OPTION_BOUNDS (numbers) or option_choices (strings) in "
                            "zoo/layers/registry.py")
        rules[name] = rule
    return rules


def options_of(cls: type) -> dict[str, Any]:
    """The keyword options a mixer or FFN accepts, with their defaults."""
    params = inspect.signature(cls.__init__).parameters
    return {
        name: (p.default if p.default is not inspect.Parameter.empty else None)
        for name, p in params.items()
        if name not in ("self", "d_model", "layer_idx") and p.kind == p.KEYWORD_ONLY
    }


# ---------------------------------------------------------------------------------------------
# specs


def _split_spec(spec: Mapping[str, Any] | str, kind: str, registry: dict,
                where: str) -> tuple[str, dict]:
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise ValueError(f"{where}={spec!r} must be a {kind} type name or a mapping with a "
                         f"'type' key; registered {kind}s: {sorted(registry)}")
    name = spec["type"]
    if not isinstance(name, str) or name not in registry:
        raise ValueError(
            f"{where}.type={name!r} is not registered; registered {kind}s: {sorted(registry)}"
        )
    options = {k: v for k, v in spec.items() if k != "type"}
    rules = option_rules(registry[name])
    unknown = [k for k in options if k not in rules]
    if unknown:
        raise ValueError(f"{where}: {kind} {name!r} has no option {unknown[0]!r}; its options "
                         f"are {sorted(rules)}")
    for option, value in options.items():
        if not rules[option].admits(value):
            raise ValueError(f"{where}.{option}={value!r} {rules[option].refusal()} "
                             f"({kind} {name!r})")
    return name, options


def validate_mixer_spec(spec: Mapping[str, Any] | str, where: str = "mixer") -> None:
    """Check a mixer spec's type and each option's type and range; `where` prefixes errors."""
    _split_spec(spec, "mixer", MIXERS, where)


def validate_ffn_spec(spec: Mapping[str, Any] | str, where: str = "ffn") -> None:
    """Check an FFN spec's type and each option's type and range; `where` prefixes errors."""
    _split_spec(spec, "ffn", FFNS, where)


def build_mixer(spec: Mapping[str, Any] | str, d_model: int, layer_idx: int = 0, *,
                where: str = "mixer") -> Mixer:
    """Build a registered mixer from its spec, e.g. {"type": "attention", "n_heads": 4}."""
    name, options = _split_spec(spec, "mixer", MIXERS, where)
    return MIXERS[name](d_model, layer_idx, **options)


def build_ffn(spec: Mapping[str, Any] | str, d_model: int, *, where: str = "ffn") -> FFN:
    """Build a registered FFN from its spec, e.g. {"type": "swiglu", "hidden_size": 256}."""
    name, options = _split_spec(spec, "ffn", FFNS, where)
    return FFNS[name](d_model, **options)
