"""Name -> class registries for mixers and FFNs, and the builders that read a config spec.

A spec is plain data: {"type": "attention", "n_heads": 8, ...}. Unknown types and unknown
options are errors that list what is allowed.
"""

from __future__ import annotations

import inspect
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


def options_of(cls: type) -> dict[str, Any]:
    """The keyword options a mixer or FFN accepts, with their defaults."""
    params = inspect.signature(cls.__init__).parameters
    return {
        name: (p.default if p.default is not inspect.Parameter.empty else None)
        for name, p in params.items()
        if name not in ("self", "d_model", "layer_idx") and p.kind == p.KEYWORD_ONLY
    }


def _split_spec(spec: Mapping[str, Any] | str, kind: str, registry: dict) -> tuple[str, dict]:
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise ValueError(f"{kind} spec must be a mapping with a 'type' key, got {spec!r}")
    name = spec["type"]
    if name not in registry:
        raise ValueError(
            f"{kind}.type={name!r} is not registered; registered {kind}s: {sorted(registry)}"
        )
    options = {k: v for k, v in spec.items() if k != "type"}
    allowed = options_of(registry[name])
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"{kind} {name!r} has no option {unknown[0]!r}; its options are {sorted(allowed)}"
        )
    return name, options


def validate_mixer_spec(spec: Mapping[str, Any] | str) -> None:
    _split_spec(spec, "mixer", MIXERS)


def validate_ffn_spec(spec: Mapping[str, Any] | str) -> None:
    _split_spec(spec, "ffn", FFNS)


def build_mixer(spec: Mapping[str, Any] | str, d_model: int, layer_idx: int = 0) -> Mixer:
    """Build a registered mixer from its spec, e.g. {"type": "attention", "n_heads": 4}."""
    name, options = _split_spec(spec, "mixer", MIXERS)
    return MIXERS[name](d_model, layer_idx, **options)


def build_ffn(spec: Mapping[str, Any] | str, d_model: int) -> FFN:
    """Build a registered FFN from its spec, e.g. {"type": "swiglu", "hidden_size": 256}."""
    name, options = _split_spec(spec, "ffn", FFNS)
    return FFNS[name](d_model, **options)
