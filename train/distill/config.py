"""The run config of `zoo distill`: the teacher, the student, the losses, the two stages, and
the sections shared with `zoo train` (data, optim, train, checkpoint), checked field by field."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from zoo.layers import validate_mixer_spec
from zoo.train.config import (
    CheckpointSection,
    DataSection,
    OptimSection,
    RunConfig,
    RunConfigError,
    TrainSection,
    _build,
    _check_choice,
    _check_float,
    _check_int,
    _check_str,
    _fail,
    apply_overrides,
    check_model_config,
    read_run_yaml,
)
from zoo.train.lora import LoraSpec

TEACHER_LOGITS = ("online", "cache")
TRAINABLE = ("all", "mixers", "new", "adapters")
DTYPES = ("float32", "bfloat16")
LOSS_FIELDS = ("forward_kl", "reverse_kl", "ce", "hidden", "seq_kd")


@dataclasses.dataclass
class TeacherSection:
    source: str = ""  # a zoo model dir, `zoo train` out_dir or checkpoint, a transformers dir,
    # a GGUF file, or a short name (smollm2-135m)
    dtype: str = "float32"  # the teacher's weights: float32 | bfloat16


@dataclasses.dataclass
class StudentSection:
    config: str | None = None  # a shipped model config name or YAML path
    overrides: dict = dataclasses.field(default_factory=dict)  # top-level ZooConfig fields
    linearize: dict | None = None  # {mixer: spec, keep_attention: [layers]} instead of config


@dataclasses.dataclass
class DistillSection:
    # loss weights (0 switches a loss off)
    forward_kl: float = 1.0  # T^2 KL(teacher || student) on logits / T
    reverse_kl: float = 0.0  # T^2 KL(student || teacher)
    ce: float = 0.0  # next-token cross-entropy on the data
    hidden: float = 0.0  # white-box: hidden-state MSE over layer_map
    seq_kd: float = 0.0  # black-box: CE on teacher-generated continuations
    temperature: float = 2.0
    layer_map: list | None = None  # [[student_layer, teacher_layer], ...]; None = even spacing
    seq_kd_prompt_tokens: int = 32
    seq_kd_temperature: float = 1.0
    teacher_logits: str = "online"  # online | cache
    cache_top_k: int = 64  # cached logits per position; 0 = the full vocabulary
    cache_dir: str | None = None  # default $XDG_CACHE_HOME/zoo/teacher_logits
    trainable: str | None = None  # stage 2: all | mixers (replaced layers' mixers) | new |
    # adapters (only LoRA's); null: all, or adapters with lora (which adds them to mixers / new)
    lora: dict | None = None  # stage 2 LoRA: {rank, alpha, dropout, targets, layers}; null = off


@dataclasses.dataclass
class TransferSection:
    steps: int = 0  # stage-1 attention-transfer steps (linearised students); 0 skips it
    lr: float = 1e-2
    batch_size: int = 8
    seq_len: int | None = None  # default train.seq_len
    attention_ce: float = 0.0  # + this x the cross-entropy of the student's attention weights
    # against the teacher's (LoLCATs' xent), beside the output MSE; window_linear_attention


@dataclasses.dataclass
class DistillRunConfig:
    name: str = "distill"
    out_dir: str = "runs/distill"
    teacher: TeacherSection = dataclasses.field(default_factory=TeacherSection)
    student: StudentSection = dataclasses.field(default_factory=StudentSection)
    distill: DistillSection = dataclasses.field(default_factory=DistillSection)
    transfer: TransferSection = dataclasses.field(default_factory=TransferSection)
    data: DataSection = dataclasses.field(default_factory=lambda: DataSection(tokenizer="teacher"))
    optim: OptimSection = dataclasses.field(default_factory=lambda: OptimSection(lr=1e-3))
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)

    def check(self) -> DistillRunConfig:
        """Validate every field; errors name the dotted field, the value and what is allowed."""
        # The sections shared with `zoo train` are checked by its own RunConfig.
        RunConfig(name=self.name, out_dir=self.out_dir, data=self.data, optim=self.optim,
                  train=self.train, checkpoint=self.checkpoint).check_sections()
        _check_str(self.teacher, "source", "teacher")
        _check_choice(self.teacher, "dtype", DTYPES, "teacher")
        s = self.student
        if (s.config is None) == (s.linearize is None):
            _fail("student", {"config": s.config, "linearize": s.linearize},
                  "must set exactly one of student.config (a zoo model config) and "
                  "student.linearize ({mixer: ..., keep_attention: [...]})")
        if s.config is not None:
            _check_str(s, "config", "student")
        if not isinstance(s.overrides, Mapping):
            _fail("student.overrides", s.overrides, "must be a mapping of model config fields")
        if s.config is not None:
            check_model_config(s.config, s.overrides, "student")
        if s.linearize is not None:
            if not isinstance(s.linearize, Mapping):
                _fail("student.linearize", s.linearize,
                      "must be a mapping {mixer: spec, keep_attention: [layers]}")
            unknown = sorted(set(s.linearize) - {"mixer", "keep_attention"})
            if unknown:
                _fail(f"student.linearize.{unknown[0]}", s.linearize[unknown[0]],
                      "is not a field; allowed: mixer, keep_attention")
            if "mixer" not in s.linearize:
                _fail("student.linearize.mixer", None, "is required (e.g. {type: "
                      "linear_attention, feature_map: hedgehog})")
            try:  # the options given; those taken from the teacher are checked when built
                validate_mixer_spec(s.linearize["mixer"], "student.linearize.mixer")
            except ValueError as error:
                raise RunConfigError(str(error)) from None
            keep = s.linearize.get("keep_attention", [])
            if not isinstance(keep, list) or not all(
                    isinstance(i, int) and not isinstance(i, bool) for i in keep):
                _fail("student.linearize.keep_attention", keep, "must be a list of layer indices")
            if s.overrides:
                _fail("student.overrides", s.overrides,
                      "applies to student.config only; a linearised student has the teacher's "
                      "shape")
        d = self.distill
        for field in LOSS_FIELDS:
            _check_float(d, field, "distill", low=0.0)
        if not any(getattr(d, f) > 0 for f in LOSS_FIELDS):
            _fail("distill", {f: getattr(d, f) for f in LOSS_FIELDS},
                  f"needs at least one positive loss weight among {', '.join(LOSS_FIELDS)}")
        _check_float(d, "temperature", "distill", low=0.0, low_open=True)
        _check_float(d, "seq_kd_temperature", "distill", low=0.0)
        _check_int(d, "seq_kd_prompt_tokens", "distill", minimum=1)
        if d.seq_kd > 0 and d.seq_kd_prompt_tokens >= self.train.seq_len:
            _fail("distill.seq_kd_prompt_tokens", d.seq_kd_prompt_tokens,
                  f"must be < train.seq_len={self.train.seq_len} (the teacher generates the rest)")
        _check_choice(d, "teacher_logits", TEACHER_LOGITS, "distill")
        _check_int(d, "cache_top_k", "distill", minimum=0)
        if d.cache_dir is not None:
            _check_str(d, "cache_dir", "distill")
        if d.trainable is not None:
            _check_choice(d, "trainable", TRAINABLE, "distill")
        if d.trainable not in (None, "all") and s.linearize is None:
            _fail("distill.trainable", d.trainable,
                  "other than 'all' needs a linearised student (student.linearize)")
        if d.lora is not None:
            try:
                LoraSpec.from_dict(d.lora)
            except ValueError as error:
                raise RunConfigError(f"distill.{error}") from None
            if s.linearize is None:
                _fail("distill.lora", d.lora, "needs a linearised student (student.linearize): "
                      "the adapters go on its replaced layers")
            if d.trainable == "all":
                _fail("distill.trainable", d.trainable,
                      "with distill.lora would train the base weights the adapters stand in "
                      "for; allowed with LoRA: adapters (only the adapters), new (+ the "
                      "linearisation's new parameters), mixers (+ the replaced mixers' others)")
        elif d.trainable == "adapters":
            _fail("distill.trainable", d.trainable, "needs distill.lora (the adapters to train)")
        if d.layer_map is not None and not isinstance(d.layer_map, list):
            _fail("distill.layer_map", d.layer_map,
                  "must be a list of [student_layer, teacher_layer] pairs")
        if d.teacher_logits == "cache":
            if d.hidden > 0:
                _fail("distill.hidden", d.hidden, "needs the live teacher's hidden states; "
                      "use distill.teacher_logits=online")
            if d.reverse_kl > 0 and d.cache_top_k > 0:
                _fail("distill.reverse_kl", d.reverse_kl,
                      "needs the teacher's full distribution; use distill.cache_top_k=0 or "
                      "distill.teacher_logits=online")
        t = self.transfer
        _check_int(t, "steps", "transfer", minimum=0)
        _check_float(t, "lr", "transfer", low=0.0, low_open=True)
        _check_int(t, "batch_size", "transfer", minimum=1)
        if t.seq_len is not None:
            _check_int(t, "seq_len", "transfer", minimum=1)
        _check_float(t, "attention_ce", "transfer", low=0.0)
        if t.attention_ce > 0 and s.linearize is not None:
            from zoo.layers import MIXERS

            mixer = s.linearize["mixer"]
            kind = mixer if isinstance(mixer, str) else mixer.get("type")
            if kind in MIXERS and not hasattr(MIXERS[kind], "attention_weights"):
                _fail("transfer.attention_ce", t.attention_ce,
                      f"needs a student mixer with attention weights (window_linear_attention); "
                      f"{kind} has none: set it to 0")
        if t.steps and s.linearize is None:
            _fail("transfer.steps", t.steps,
                  "> 0 needs a linearised student (student.linearize); set it to 0")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_distill_config(name_or_path: str | Path | None = None,
                        overrides: Sequence[str] = ()) -> DistillRunConfig:
    """A distillation run config from a YAML path or a shipped run name, with `key=value`
    overrides applied, validated."""
    data = read_run_yaml(name_or_path) if name_or_path is not None else {}
    data = apply_overrides(data, overrides)
    return distill_config_from_dict(data)


def distill_config_from_dict(data: Mapping[str, Any]) -> DistillRunConfig:
    """A validated DistillRunConfig from nested mappings (a run config's YAML, as data)."""
    data = dict(data)
    for key in ("teacher", "student"):
        if isinstance(data.get(key), str):  # `teacher: smollm2-135m`, `student: <config>`
            data[key] = {"source" if key == "teacher" else "config": data[key]}
    return _build(DistillRunConfig, data, "").check()
