"""`ZooConfig`: a causal LM described as plain data (any mixer, any FFN, hybrids per layer),
and `load_config` for YAML files and shipped configs.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import PreTrainedConfig

from zoo.layers import build_ffn, build_mixer

NORMS = ("rms", "layer")


class ConfigError(ValueError):
    """A config field holds a value that zoo cannot build; the message names the field."""


class ZooConfig(PreTrainedConfig):
    """A stack of pre-norm residual blocks: [norm -> mixer] (+ [norm -> ffn]) per layer.

    Fields:
        vocab_size, d_model, n_layers: the usual sizes.
        mixer: the default sequence mixer spec, e.g. {"type": "attention", "n_heads": 8}.
        ffn: the default FFN spec, e.g. {"type": "swiglu"}, or None for mixer-only blocks (Mamba).
        layers: per-layer overrides for hybrids: [{"at": [3, 7], "mixer": {...}, "ffn": {...}}].
        norm: "rms" or "layer"; norm_eps its epsilon.
        embed_norm: a norm right after the embedding (RWKV's ln0).
        tie_word_embeddings: share the embedding with the output head (YAML: tie_embeddings).
    """

    model_type = "zoo"
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers"}

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    mixer: Any = dataclasses.field(default_factory=lambda: {"type": "attention"})
    ffn: Any = dataclasses.field(default_factory=lambda: {"type": "swiglu"})
    layers: list | None = None
    norm: str = "rms"
    norm_eps: float = 1e-5
    embed_norm: bool = False
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        if "tie_embeddings" in kwargs:
            self.tie_word_embeddings = bool(kwargs.pop("tie_embeddings"))
        self.mixer = _as_spec(self.mixer)
        self.ffn = _as_spec(self.ffn) if self.ffn is not None else None
        super().__post_init__(**kwargs)
        self.check()

    def layer_spec(self, index: int) -> tuple[dict, dict | None]:
        """The (mixer, ffn) specs of layer `index`, after the per-layer overrides."""
        mixer, ffn = self.mixer, self.ffn
        for override in self.layers or []:
            if index in override["at"]:
                mixer = _as_spec(override.get("mixer", mixer))
                if "ffn" in override:  # an explicit null removes the layer's FFN
                    ffn = _as_spec(override["ffn"]) if override["ffn"] is not None else None
        return copy.deepcopy(mixer), copy.deepcopy(ffn)

    def check(self) -> None:
        """Validate every field; errors name the field and what is allowed."""
        for name in ("vocab_size", "d_model", "n_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if self.norm not in NORMS:
            raise ConfigError(f"norm={self.norm!r} is not one of {NORMS}")
        if not isinstance(self.norm_eps, (int, float)) or self.norm_eps <= 0:
            raise ConfigError(f"norm_eps={self.norm_eps!r} must be a positive number")
        if self.layers is not None:
            if not isinstance(self.layers, list):
                raise ConfigError(f"layers must be a list of overrides, got {self.layers!r}")
            for i, override in enumerate(self.layers):
                where = f"layers[{i}]"
                if not isinstance(override, Mapping) or "at" not in override:
                    raise ConfigError(f"{where} must be a mapping with an 'at' list of layers")
                unknown = sorted(set(override) - {"at", "mixer", "ffn"})
                if unknown:
                    raise ConfigError(
                        f"{where} has unknown key {unknown[0]!r}; allowed: at, mixer, ffn"
                    )
                at = override["at"]
                if not isinstance(at, list) or not all(isinstance(j, int) for j in at):
                    raise ConfigError(f"{where}.at must be a list of layer indices, got {at!r}")
                bad = [j for j in at if not 0 <= j < self.n_layers]
                if bad:
                    raise ConfigError(
                        f"{where}.at has layer {bad[0]} outside 0..{self.n_layers - 1} (n_layers)"
                    )
        # Building every layer on the meta device checks every option without allocating.
        with torch.device("meta"):
            for index in range(self.n_layers):
                mixer, ffn = self.layer_spec(index)
                field = self._field_of(index)
                try:
                    build_mixer(mixer, self.d_model, index)
                except (ValueError, TypeError) as error:
                    raise ConfigError(f"{field}.mixer (layer {index}): {error}") from None
                if ffn is not None:
                    try:
                        build_ffn(ffn, self.d_model)
                    except (ValueError, TypeError) as error:
                        raise ConfigError(f"{field}.ffn (layer {index}): {error}") from None

    def _field_of(self, index: int) -> str:
        for i, override in enumerate(self.layers or []):
            if index in override["at"]:
                return f"layers[{i}]"
        return "config"

    def describe_layers(self) -> list[str]:
        """One line per layer: 'attention + swiglu'."""
        lines = []
        for index in range(self.n_layers):
            mixer, ffn = self.layer_spec(index)
            lines.append(f"{mixer['type']} + {ffn['type'] if ffn else 'no ffn'}")
        return lines


def _as_spec(spec: Any) -> dict:
    if isinstance(spec, str):
        return {"type": spec}
    if isinstance(spec, Mapping):
        return dict(spec)
    raise ConfigError(f"a mixer/ffn spec must be a mapping with a 'type' key, got {spec!r}")


def shipped_names(package: str) -> list[str]:
    """The stems of the YAML files shipped in `package` ("zoo.configs", "zoo.configs.train")."""
    folder = importlib.resources.files(package)
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def shipped_configs() -> list[str]:
    """Names of the configs shipped in zoo.configs (the YAML files' stems)."""
    return shipped_names("zoo.configs")


def read_yaml(
    name_or_path: str | Path, package: str, kind: str, error: type[ValueError] = ConfigError
) -> dict:
    """The YAML mapping in a file, or in the config shipped in `package` under that name.

    A name ending in .yaml / .yml, or naming a file that exists, is a path; anything else is the
    stem of a YAML file in `package`. `kind` ("config", "run config") names what was asked for
    in the errors: FileNotFoundError for a missing path, `error` for a name `package` does not
    ship and for YAML that is not a mapping.
    """
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"{kind} file {str(path)!r} does not exist")
        text = path.read_text()
    else:
        resource = importlib.resources.files(package) / f"{name_or_path}.yaml"
        if not resource.is_file():
            raise error(
                f"{str(name_or_path)!r} is neither a YAML file nor a shipped {kind}; "
                f"shipped: {', '.join(shipped_names(package))}"
            )
        text = resource.read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, Mapping):
        raise error(
            f"{name_or_path}: a {kind} must be a YAML mapping, got a {type(data).__name__}"
        )
    return dict(data)


def load_config(name_or_path: str | Path, **overrides: Any) -> ZooConfig:
    """Read a YAML model config: a path, or the name of a shipped config ("attention-tiny").

    Keyword overrides replace top-level fields (`load_config("attention-tiny", n_layers=4)`).
    """
    data = {**read_yaml(name_or_path, "zoo.configs", "config"), **overrides}
    allowed = {f.name for f in dataclasses.fields(ZooConfig)} | {"tie_embeddings"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(
            f"{name_or_path}: unknown config field {unknown[0]!r}; fields: "
            f"vocab_size, d_model, n_layers, mixer, ffn, layers, norm, norm_eps, embed_norm, "
            f"tie_embeddings, initializer_range, bos_token_id, eos_token_id, pad_token_id"
        )
    return ZooConfig(**data)
