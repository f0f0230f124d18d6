"""Run configs: plain dataclasses filled from YAML, then `--set key=value` overrides.

    name: demo
    out_dir: runs/demo
    strategy: none              # none | ddp | fsdp (under torchrun)
    model: {config: attention-tiny, overrides: {n_layers: 4}}
    data: {source: text, paths: [], tokenizer: byte}
    optim: {lr: 3.0e-3, warmup_steps: 20, grad_clip: 1.0, grad_accum: 1}
    train: {steps: 200, batch_size: 16, seq_len: 256, precision: float32}
    checkpoint: {interval: 100, keep_last: 3}
    quant: none                 # none | int8 | int4: quantisation-aware training (compression/qat)
    quant_group_size: 32        # int4's inputs per scale: 32 | 64 | 128 (int8: per output channel)

Every field is checked in `RunConfig.check()`; an error names the dotted field, the value and
what is allowed (`train.batch_size=0 must be a positive integer`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from zoo.compression import INT4_GROUP_SIZES
from zoo.config import ConfigError, ZooConfig, load_config, parse_yaml, read_yaml, shipped_names

STRATEGIES = ("none", "ddp", "fsdp")
SOURCES = ("text", "mqar", "selective_copying", "induction_heads")
PRECISIONS = ("float32", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
# quantisation-aware training: the weights every targeted linear layer trains through
QUANT_FORMATS = ("none", "int8", "int4")


class RunConfigError(ValueError):
    """A run-config field holds a value the trainer cannot use; the message names the field."""


@dataclasses.dataclass
class ModelSection:
    config: str = "attention-tiny"  # a shipped model config name or a YAML path
    overrides: dict = dataclasses.field(default_factory=dict)  # top-level ZooConfig fields


@dataclasses.dataclass
class DataSection:
    source: str = "text"  # text, or a synthetic task: mqar | selective_copying | induction_heads
    # text: files, folders (every *.py, *.txt, *.md below) or globs; empty = the Python
    # standard library of the running interpreter.
    paths: list = dataclasses.field(default_factory=list)
    tokenizer: str = "byte"  # "byte" (vocab 256, no files) or a local tokenizer dir / .json
    max_bytes: int | None = None  # a deterministic subset of the files (sorted, by size)
    val_fraction: float = 0.05  # whole documents, about this share of the tokens, held out
    cache_dir: str | None = None  # token cache; default $XDG_CACHE_HOME/zoo/tokens
    # synthetic tasks
    vocab_size: int = 64  # the task's tokens, <= the model's vocab_size
    num_kv_pairs: int = 8  # mqar: key-value pairs in the context (and queries after it)
    num_tokens: int = 8  # selective_copying: tokens to copy


@dataclasses.dataclass
class OptimSection:
    lr: float = 3e-3  # AdamW peak learning rate
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio at the last step
    warmup_steps: int = 20  # linear warm-up from 0
    weight_decay: float = 0.1  # on matrices only, not on norms' gains or biases
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    grad_accum: int = 1  # micro-batches per optimizer step


@dataclasses.dataclass
class TrainSection:
    steps: int = 200  # optimizer steps
    batch_size: int = 16  # sequences per optimizer step, over all ranks and micro-batches
    seq_len: int = 256
    seed: int = 0
    precision: str = "float32"  # float32 | bfloat16 (autocast, on the CPU and CUDA)
    compile: bool = False  # torch.compile the model
    device: str = "auto"  # auto = cuda when available
    eval_interval: int = 50  # steps between validation passes; 0 = only at the end
    eval_batches: int = 4  # validation batches (of batch_size sequences) per pass
    log_interval: int = 1  # steps between metrics.jsonl records
    threads: int | None = None  # torch.set_num_threads; None leaves torch's default


@dataclasses.dataclass
class CheckpointSection:
    interval: int = 100  # steps between checkpoints; 0 = only at the end and on a signal
    keep_last: int = 3  # checkpoints kept on disk (the newest)


@dataclasses.dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs/run"
    strategy: str = "none"
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    # fake-quantised weights with a straight-through gradient (zoo.compression.qat), so that
    # `zoo compress <out>/final ... --weights <quant>` loses little
    quant: str = "none"
    quant_group_size: int = 32  # int4 only: int8 is per output channel, as quantize_model's

    @property
    def quant_format(self) -> tuple[str, int | None] | None:
        """(weights, group_size) quantize_model takes for this run's QAT, or None without."""
        if self.quant == "none":
            return None
        return self.quant, self.quant_group_size if self.quant == "int4" else None

    def check(self, world_size: int = 1) -> RunConfig:
        """Validate every field (and the batch split over `world_size` ranks), the model config
        the run names included; returns self."""
        self.check_sections(world_size)
        check_model_config(self.model.config, self.model.overrides, "model")
        return self

    def check_sections(self, world_size: int = 1) -> RunConfig:
        """Validate every field but the model config the run names (loaded by `check`)."""
        _check_str(self, "name")
        _check_str(self, "out_dir")
        _check_choice(self, "strategy", STRATEGIES)
        m = self.model
        _check_str(m, "config", "model")
        if not isinstance(m.overrides, Mapping):
            raise RunConfigError(
                f"model.overrides={m.overrides!r} must be a mapping of model config fields"
            )
        d = self.data
        _check_choice(d, "source", SOURCES, "data")
        if not isinstance(d.paths, list) or not all(isinstance(p, str) for p in d.paths):
            raise RunConfigError(
                f"data.paths={d.paths!r} must be a list of files, folders or globs"
            )
        _check_str(d, "tokenizer", "data")
        if d.max_bytes is not None:
            _check_int(d, "max_bytes", "data", minimum=1)
        _check_float(d, "val_fraction", "data", low=0.0, high=0.5, low_open=True)
        if d.cache_dir is not None:
            _check_str(d, "cache_dir", "data")
        _check_int(d, "vocab_size", "data", minimum=4)
        _check_int(d, "num_kv_pairs", "data", minimum=1)
        _check_int(d, "num_tokens", "data", minimum=1)
        o = self.optim
        _check_float(o, "lr", "optim", low=0.0, low_open=True)
        _check_float(o, "min_lr_ratio", "optim", low=0.0, high=1.0)
        _check_int(o, "warmup_steps", "optim", minimum=0)
        _check_float(o, "weight_decay", "optim", low=0.0)
        _check_float(o, "beta1", "optim", low=0.0, high=1.0)
        _check_float(o, "beta2", "optim", low=0.0, high=1.0)
        _check_float(o, "eps", "optim", low=0.0, low_open=True)
        _check_float(o, "grad_clip", "optim", low=0.0)
        _check_int(o, "grad_accum", "optim", minimum=1)
        t = self.train
        for field in ("steps", "batch_size", "seq_len", "eval_batches", "log_interval"):
            _check_int(t, field, "train", minimum=1)
        _check_int(t, "seed", "train", minimum=0)
        _check_int(t, "eval_interval", "train", minimum=0)
        _check_choice(t, "precision", PRECISIONS, "train")
        _check_choice(t, "device", DEVICES, "train")
        _check_bool(t, "compile", "train")
        if t.threads is not None:
            _check_int(t, "threads", "train", minimum=1)
        c = self.checkpoint
        _check_int(c, "interval", "checkpoint", minimum=0)
        _check_int(c, "keep_last", "checkpoint", minimum=1)
        _check_choice(self, "quant", QUANT_FORMATS)
        size = self.quant_group_size
        if not isinstance(size, int) or isinstance(size, bool) or size not in INT4_GROUP_SIZES:
            _fail("quant_group_size", self.quant_group_size,
                  f"is not one of {', '.join(map(str, INT4_GROUP_SIZES))} (int4's groups)")
        split = o.grad_accum * world_size
        if t.batch_size % split:
            raise RunConfigError(
                f"train.batch_size={t.batch_size} must be divisible by optim.grad_accum "
                f"({o.grad_accum}) x ranks ({world_size}) = {split}"
            )
        if self.strategy == "none" and world_size > 1:
            raise RunConfigError(
                f"strategy='none' cannot run on {world_size} ranks; allowed under torchrun: "
                "ddp, fsdp"
            )
        return self

    @property
    def micro_batch_size(self) -> int:
        """Global sequences per micro-batch (over all ranks)."""
        return self.train.batch_size // self.optim.grad_accum

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _fail(where: str, value: Any, allowed: str) -> None:
    raise RunConfigError(f"{where}={value!r} {allowed}")


def _name(section: str | None, field: str) -> str:
    return f"{section}.{field}" if section else field


def _check_str(obj: Any, field: str, section: str | None = None) -> None:
    value = getattr(obj, field)
    if not isinstance(value, str) or not value:
        _fail(_name(section, field), value, "must be a non-empty string")


def _check_bool(obj: Any, field: str, section: str | None = None) -> None:
    value = getattr(obj, field)
    if not isinstance(value, bool):
        _fail(_name(section, field), value, "must be true or false")


def _check_choice(obj: Any, field: str, choices: Sequence[str], section: str | None = None) -> None:
    value = getattr(obj, field)
    if value not in choices:
        _fail(_name(section, field), value, f"is not one of {', '.join(choices)}")


def _check_int(obj: Any, field: str, section: str | None = None, *, minimum: int) -> None:
    value = getattr(obj, field)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        _fail(_name(section, field), value, f"must be {what}")


def _check_float(
    obj: Any, field: str, section: str | None = None, *, low: float | None = None,
    high: float | None = None, low_open: bool = False,
) -> None:
    value = getattr(obj, field)
    where = _name(section, field)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        _fail(where, value, "must be a number")
    if isinstance(value, float) and not math.isfinite(value):
        _fail(where, value, "must be a finite number")
    if low is not None and (value < low or (low_open and value == low)):
        bound = f"> {low}" if low_open else f">= {low}"
        _fail(where, value, f"must be {bound}" + (f" and <= {high}" if high is not None else ""))
    if high is not None and value > high:
        _fail(where, value, f"must be <= {high}")


# ---------------------------------------------------------------------------------------------
# YAML -> dataclasses, and --set overrides


def from_dict(data: Mapping[str, Any]) -> RunConfig:
    """Build a RunConfig from nested mappings; an unknown key names itself and the allowed ones.

    `model` may be a bare string (the model config name) instead of a mapping.
    """
    if not isinstance(data, Mapping):
        raise RunConfigError(f"a run config must be a mapping of sections, got {data!r}")
    data = dict(data)
    if isinstance(data.get("model"), str):
        data["model"] = {"config": data["model"]}
    return _build(RunConfig, data, "")


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise RunConfigError(
            f"unknown run-config field {prefix + unknown[0]!r}; allowed here: {', '.join(fields)}"
        )
    kwargs = {}
    for key, value in data.items():
        default = fields[key].default_factory() if _has_factory(fields[key]) else None
        if dataclasses.is_dataclass(default):
            if not isinstance(value, Mapping):
                raise RunConfigError(
                    f"{prefix + key}={value!r} must be a mapping with fields "
                    f"{', '.join(f.name for f in dataclasses.fields(default))}"
                )
            value = _build(type(default), value, f"{prefix}{key}.")
        kwargs[key] = value
    return cls(**kwargs)


def _has_factory(field: dataclasses.Field) -> bool:
    return field.default_factory is not dataclasses.MISSING


def apply_overrides(data: dict, assignments: Sequence[str]) -> dict:
    """`["train.steps=10", "model.overrides.n_layers=4"]` into the nested dict (values as YAML)."""
    data = _deepcopy(data)
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key:
            raise RunConfigError(f"--set {assignment!r} must look like key=value (dotted keys)")
        # zoo's YAML reader, as for files: "1e-3" is a number, bad YAML names the option
        value = parse_yaml(text, f"--set {key}", RunConfigError) if text else ""
        parts = key.split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if isinstance(child, str) and part == "model" and i == 0:
                child = {"config": child}  # `model: attention-tiny` shorthand, now being extended
            if child is None:
                child = {}
            if not isinstance(child, dict):
                raise RunConfigError(
                    f"--set {key}: {'.'.join(parts[: i + 1])} is {child!r}, not a section"
                )
            node[part] = child
            node = child
        node[parts[-1]] = value
    return data


def _deepcopy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


def check_model_config(config: str, overrides: Mapping[str, Any], field: str) -> ZooConfig:
    """The model config a run names (`field`: "model", "student"), with its overrides, loaded
    and checked; an error names the run-config field and the model config's own field."""
    with_overrides = f" with {field}.overrides" if overrides else ""
    bad_keys = [key for key in overrides if not isinstance(key, str)]
    if bad_keys:
        raise RunConfigError(f"{field}.overrides has key {bad_keys[0]!r}; its keys are model "
                             "config field names")
    try:
        return load_config(config, **dict(overrides))
    except (ConfigError, FileNotFoundError) as error:
        raise RunConfigError(f"{field} (config {config!r}{with_overrides}): {error}") from None


def shipped_runs() -> list[str]:
    """Names of the run configs shipped in zoo.configs.train."""
    return shipped_names("zoo.configs.train")


def read_run_yaml(name_or_path: str | Path) -> dict:
    """The YAML mapping of a run config file, or of a shipped run ("demo", "mqar")."""
    return read_yaml(name_or_path, "zoo.configs.train", "run config", RunConfigError)


def load_run_config(
    name_or_path: str | Path | None = None, overrides: Sequence[str] = (), world_size: int = 1
) -> RunConfig:
    """Read a run config (a YAML path, a shipped run name, or None for the defaults), apply the
    `key=value` overrides and validate it.
    """
    data = read_run_yaml(name_or_path) if name_or_path is not None else {}
    return from_dict(apply_overrides(data, overrides)).check(world_size)
