"""`ZooConfig`: a causal LM described as plain data (any mixer, any FFN, hybrids per layer),
and `load_config` for YAML files and shipped configs.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import PreTrainedConfig

from zoo.compression import check_quantization_section
from zoo.layers import build_ffn, build_mixer, validate_ffn_spec, validate_mixer_spec
from zoo.layers.attention import KV_CACHE_FORMATS, apply_kv_cache

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
        quantization: null, or the section zoo.compression.quantize_model writes (weights
            format, group size, method, the quantised layers' names), which the model reads to
            build those layers as QuantizedLinear before loading their tensors.
        kv_cache: what every softmax-attention layer's KV cache holds while decoding: "float"
            (the model's dtype), "int8" (per token) or "int4" (KIVI: keys per channel in groups
            of tokens, values per token, the newest tokens exact); layers/attention.py.
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
    quantization: dict | None = None
    kv_cache: str = "float"

    def __post_init__(self, **kwargs):
        if "tie_embeddings" in kwargs:
            tie = kwargs.pop("tie_embeddings")
            if not isinstance(tie, bool):
                raise ConfigError(f"tie_embeddings={tie!r} must be true or false")
            self.tie_word_embeddings = tie
        self.mixer = _as_spec(self.mixer, "config.mixer")
        self.ffn = _as_spec(self.ffn, "config.ffn") if self.ffn is not None else None
        super().__post_init__(**kwargs)
        self.check()

    def layer_spec(self, index: int) -> tuple[dict, dict | None]:
        """The (mixer, ffn) specs of layer `index`, after the per-layer overrides."""
        mixer, ffn = self.mixer, self.ffn
        for i, override in enumerate(self.layers or []):
            if index in override["at"]:
                mixer = _as_spec(override.get("mixer", mixer), f"layers[{i}].mixer")
                if "ffn" in override:  # an explicit null removes the layer's FFN
                    ffn = None if override["ffn"] is None else _as_spec(
                        override["ffn"], f"layers[{i}].ffn")
        return copy.deepcopy(mixer), copy.deepcopy(ffn)

    def check(self) -> None:
        """Validate every field; errors name the field and what is allowed."""
        for name in ("vocab_size", "d_model", "n_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if not isinstance(self.norm, str) or self.norm not in NORMS:
            raise ConfigError(f"norm={self.norm!r} is not one of {NORMS}")
        for name in ("norm_eps", "initializer_range"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 < value < math.inf:
                raise ConfigError(f"{name}={value!r} must be a finite number > 0")
        for name in ("embed_norm", "tie_word_embeddings", "use_cache"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be true or false")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or not 0 <= value < self.vocab_size):
                raise ConfigError(f"{name}={value!r} must be null or a token id in "
                                  f"[0, vocab_size={self.vocab_size})")
        if self.quantization is not None:
            _named_check(check_quantization_section, self.quantization, "quantization")
            if self.tie_word_embeddings and "lm_head" in self.quantization["modules"]:
                raise ConfigError("quantization.modules holds lm_head, so the head is no longer "
                                  "the embedding table: tie_word_embeddings must be false")
        if not isinstance(self.kv_cache, str) or self.kv_cache not in KV_CACHE_FORMATS:
            raise ConfigError(f"kv_cache={self.kv_cache!r} is not one of {KV_CACHE_FORMATS}")
        _named_check(validate_mixer_spec, self.mixer, "config.mixer")
        if self.ffn is not None:
            _named_check(validate_ffn_spec, self.ffn, "config.ffn")
        if self.layers is not None:
            if not isinstance(self.layers, list):
                raise ConfigError(f"layers must be a list of overrides, got {self.layers!r}")
            for i, override in enumerate(self.layers):
                where = f"layers[{i}]"
                if not isinstance(override, Mapping) or "at" not in override:
                    raise ConfigError(f"{where} must be a mapping with an 'at' list of layers")
                unknown = [key for key in override if key not in ("at", "mixer", "ffn")]
                if unknown:
                    raise ConfigError(
                        f"{where} has unknown key {unknown[0]!r}; allowed: at, mixer, ffn"
                    )
                at = override["at"]
                if not isinstance(at, list) or not at or not all(
                        isinstance(j, int) and not isinstance(j, bool) for j in at):
                    raise ConfigError(
                        f"{where}.at={at!r} must be a non-empty list of layer indices")
                bad = [j for j in at if not 0 <= j < self.n_layers]
                if bad:
                    raise ConfigError(
                        f"{where}.at has layer {bad[0]} outside 0..{self.n_layers - 1} (n_layers)"
                    )
                if "mixer" in override:
                    _named_check(validate_mixer_spec, _as_spec(override["mixer"], f"{where}.mixer"),
                                 f"{where}.mixer")
                if override.get("ffn") is not None:
                    _named_check(validate_ffn_spec, _as_spec(override["ffn"], f"{where}.ffn"),
                                 f"{where}.ffn")
        # Building every layer on the meta device checks what depends on several options and
        # on d_model (divisibility, top_k <= n_experts) without allocating.
        with torch.device("meta"):
            for index in range(self.n_layers):
                mixer, ffn = self.layer_spec(index)
                where = f"{self._field_of(index, 'mixer')}.mixer"
                try:
                    built = build_mixer(mixer, self.d_model, index, where=where)
                except (ValueError, TypeError, RuntimeError) as error:
                    raise ConfigError(f"{where} (layer {index}): {error}") from None
                try:
                    apply_kv_cache(built, self.kv_cache)
                except ValueError as error:
                    raise ConfigError(f"kv_cache={self.kv_cache!r} at {where}: {error}") from None
                if ffn is not None:
                    where = f"{self._field_of(index, 'ffn')}.ffn"
                    try:
                        build_ffn(ffn, self.d_model, where=where)
                    except (ValueError, TypeError, RuntimeError) as error:
                        raise ConfigError(f"{where} (layer {index}): {error}") from None

    def _field_of(self, index: int, part: str) -> str:
        """Where layer `index` takes its `part` ("mixer" or "ffn") from: the last override
        that sets it, else the config's default."""
        field = "config"
        for i, override in enumerate(self.layers or []):
            if index in override["at"] and part in override:
                field = f"layers[{i}]"
        return field

    def describe_layers(self) -> list[str]:
        """One line per layer: 'attention + swiglu'."""
        lines = []
        for index in range(self.n_layers):
            mixer, ffn = self.layer_spec(index)
            lines.append(f"{mixer['type']} + {ffn['type'] if ffn else 'no ffn'}")
        return lines


def _as_spec(spec: Any, where: str) -> dict:
    if isinstance(spec, str):
        return {"type": spec}
    if isinstance(spec, Mapping):
        return dict(spec)
    raise ConfigError(f"{where}={spec!r} must be a type name or a mapping with a 'type' key")


def _named_check(validate, spec: Mapping[str, Any], where: str) -> None:
    """Run a registry check of the spec at `where`, its error as a ConfigError."""
    try:
        validate(spec, where)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def shipped_names(package: str) -> list[str]:
    """The stems of the YAML files shipped in `package` ("zoo.configs", "zoo.configs.train")."""
    folder = importlib.resources.files(package)
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def shipped_configs() -> list[str]:
    """Names of the configs shipped in zoo.configs (the YAML files' stems)."""
    return shipped_names("zoo.configs")


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with two fixes for configs: a number in exponent form without a dot
    ("1e-5", "3e4") is a float, as in YAML 1.2 and JSON (YAML 1.1 reads it as a string), and a
    key given twice in one mapping is an error (YAML 1.1 keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (lines {seen[key]} and {line})",
                    key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep)


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def parse_yaml(text: str, source: str, error: type[ValueError] = ConfigError) -> Any:
    """The value of a YAML document read with `YamlLoader`; a syntax error is an `error` that
    names `source` (a file, a --set option) and the line and column."""
    try:
        return yaml.load(text, Loader=YamlLoader)  # safe: YamlLoader is a SafeLoader
    except yaml.MarkedYAMLError as bad:
        mark, opened = bad.problem_mark or bad.context_mark, bad.context_mark
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = bad.problem or bad.context
        if bad.problem and bad.context:
            problem += f" ({bad.context}" + (
                f" from line {opened.line + 1}, column {opened.column + 1})" if opened else ")")
        raise error(f"{source}{at}: not valid YAML: {problem}") from None
    except yaml.YAMLError as bad:
        raise error(f"{source}: not valid YAML: {bad}") from None


def read_yaml(
    name_or_path: str | Path, package: str, kind: str, error: type[ValueError] = ConfigError
) -> dict:
    """The YAML mapping in a file, or in the config shipped in `package` under that name.

    A name ending in .yaml / .yml, or naming a file that exists, is a path; anything else is the
    stem of a YAML file in `package`. `kind` ("config", "run config") names what was asked for
    in the errors: FileNotFoundError for a missing path, `error` for a name `package` does not
    ship, for a YAML syntax error (with its line), and for YAML that is not a mapping or is
    empty (an empty file would otherwise mean every default).
    """
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"{kind} file {str(path)!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as bad:
            raise error(f"{path}: a {kind} must be UTF-8 text ({bad.reason} at byte "
                        f"{bad.start})") from None
    else:
        resource = importlib.resources.files(package) / f"{name_or_path}.yaml"
        if not resource.is_file():
            raise error(
                f"{str(name_or_path)!r} is neither a YAML file nor a shipped {kind}; "
                f"shipped: {', '.join(shipped_names(package))}"
            )
        text = resource.read_text(encoding="utf-8")
    data = parse_yaml(text, str(name_or_path), error)
    if data is None or data == {}:
        raise error(f"{name_or_path}: the {kind} is empty; a {kind} is a YAML mapping of "
                    "fields (an empty one would silently mean every default)")
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
    unknown = [key for key in data if key not in allowed]
    if unknown:
        raise ConfigError(
            f"{name_or_path}: unknown config field {unknown[0]!r}; fields: "
            f"vocab_size, d_model, n_layers, mixer, ffn, layers, norm, norm_eps, embed_norm, "
            f"tie_embeddings, initializer_range, bos_token_id, eos_token_id, pad_token_id, "
            f"kv_cache"
        )
    return ZooConfig(**data)
