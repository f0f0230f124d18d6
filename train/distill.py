"""`zoo distill RUN.yaml`: knowledge distillation of a teacher into a zoo student, with
linearisation (attention transfer) as an optional first stage.

    name: smollm2-hedgehog
    out_dir: runs/smollm2-hedgehog
    teacher: {source: smollm2-135m}          # a zoo model dir / `zoo train` out_dir / checkpoint,
                                             # a local transformers dir, or a short name
    student: {linearize: {mixer: {type: linear_attention, feature_map: hedgehog},
                          keep_attention: []}}
             # or {config: linear-attention-small, overrides: {...}}
    distill: {forward_kl: 1.0, reverse_kl: 0.0, ce: 0.0, hidden: 0.0, seq_kd: 0.0,
              temperature: 2.0, teacher_logits: online}   # online | cache
             # + lora: {rank: 8, alpha: 16, dropout: 0, targets: [q_proj, k_proj, v_proj,
             #   o_proj]}                             # stage 2 through LoRA (LoLCATs)
    transfer: {steps: 100, lr: 1.0e-2}       # stage 1 (linearised students only)
    data: {tokenizer: teacher}               # train's data section; "teacher" = its tokenizer
    optim / train / checkpoint: as in `zoo train`

Teacher logits are computed on the fly (`teacher_logits: online`), or cached to disk
(`cache`): for every training window of seq_len tokens the teacher's top-k logits (k =
`cache_top_k`; 0 keeps the full vocabulary, sensible only for small vocabularies such as the
byte tokenizer's 256) are stored as float16 values and integer ids in numpy memmaps under
`<cache_dir>/<key>/`, filled lazily the first time a window is trained on. The key hashes the
teacher's weights, the token cache, seq_len and k, so any student distilled from the same
teacher on the same data reuses it. The top-k forward KL renormalises the teacher over its k
tokens (the mass outside them is dropped); reverse KL and hidden-state matching need the live
teacher and refuse the cache.

Sequence-level KD (`seq_kd` > 0): each step the teacher continues the first
`seq_kd_prompt_tokens` tokens of every sequence to seq_len tokens (sampling at
`seq_kd_temperature`; zoo teachers decode through their recurrent cache), and the student is
trained with cross-entropy on the generated tokens. It costs seq_len - prompt teacher decode
steps per training step.

LoRA in stage 2 (`distill.lora`, null = off): after stage 1, the replaced layers' projections
(`targets`; `layers` overrides which layers) get low-rank adapters (zoo.train.lora) and their
base weights freeze. `distill.trainable` then says what trains beside the adapters: `adapters`
(the default with LoRA) nothing (LoLCATs: the feature maps stay as stage 1 left them), `new` the
linearisation's new parameters, `mixers` the replaced mixers' other parameters; `all` is
refused, as it would train the weights the adapters stand in for. Checkpoints hold the adapters
unmerged (a resume re-injects them before loading); `final/` holds the merged student, a plain
zoo model.

Single process: the teacher and the student share one device (no DDP/FSDP here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from zoo.config import ConfigError, ZooConfig, load_config
from zoo.model import ZooForCausalLM
from zoo.tokenizer import has_tokenizer_files
from zoo.train import losses as L
from zoo.train.checkpoint import (
    CheckpointError,
    check_model_tensors,
    latest_checkpoint,
    load_checkpoint,
    read_state,
    restore_rng,
    save_checkpoint,
    save_final,
)
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
    read_run_yaml,
)
from zoo.train.data import (
    PackedTextDataset,
    Tokenizer,
    build_dataset,
    default_cache_dir,
    load_tokenizer,
)
from zoo.train.linearize import attention_transfer, linearize
from zoo.train.lora import (
    LoraSpec,
    adapted_base_parameter_names,
    add_lora,
    check_lora,
    merge_lora,
)
from zoo.train.metrics import METRICS_FILE, MetricsLog, read_metrics
from zoo.train.trainer import IGNORE, build_optimizer, seed_everything, warmup_cosine

TEACHER_LOGITS = ("online", "cache")
TRAINABLE = ("all", "mixers", "new", "adapters")
DTYPES = ("float32", "bfloat16")
LOSS_FIELDS = ("forward_kl", "reverse_kl", "ce", "hidden", "seq_kd")
PLOT_FILE = "distill.png"
SUMMARY_FILE = "summary.json"
PROJECTION_PREFIX = "distill_projection."  # hidden-state projections, beside the student's weights
# A probe text for "same tokenizer?" when two tokenizer files differ byte-wise.
PROBE = "def f(x):\n    return {'k': x ** 2}  # naïve — ünïcode ✓\n\tclass A(B): pass\n"


# ---------------------------------------------------------------------------------------------
# Run config


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
                  train=self.train, checkpoint=self.checkpoint).check()
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


# ---------------------------------------------------------------------------------------------
# The teacher


@dataclasses.dataclass
class Teacher:
    model: nn.Module  # a ZooForCausalLM, or any transformers causal LM
    tokenizer: str | None  # a data.tokenizer spec ("byte" or a local directory), or None
    source: str

    @property
    def is_zoo(self) -> bool:
        return isinstance(self.model, ZooForCausalLM)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def n_layers(self) -> int:
        config = self.model.config
        return int(getattr(config, "n_layers", None) or config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        config = self.model.config
        return int(getattr(config, "d_model", None) or config.hidden_size)

    def fingerprint(self) -> str:
        """sha256 over the teacher's weights: the logits cache's key."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:24]

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, hidden: bool = False):
        """(logits (B, T, V), hidden_states or None)."""
        out = self.model(input_ids=ids, use_cache=False, output_hidden_states=hidden)
        return out.logits, (out.hidden_states if hidden else None)


def _save_tokenizer(tokenizer: Any, name: str) -> str:
    """A tokenizer object (e.g. from a GGUF file) saved once where data.tokenizer can name it."""
    root = default_cache_dir().parent / "tokenizers"
    folder = root / name
    if not (folder / "tokenizer_config.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process saved it first
            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def _zoo_run_tokenizer(run_config: Mapping[str, Any] | None) -> str | None:
    if not run_config:
        return None
    return (run_config.get("data") or {}).get("tokenizer")


def load_teacher(source: str | nn.Module, dtype: str = "float32") -> Teacher:
    """The teacher a run config names (see TeacherSection.source), in eval mode, frozen."""
    torch_dtype = getattr(torch, dtype)
    if isinstance(source, nn.Module):
        model, tokenizer, name = source, None, type(source).__name__
        tokenizer = "byte" if getattr(source.config, "vocab_size", None) == 256 else None
    else:
        name = str(source)
        model, tokenizer = _load_teacher_model(name, torch_dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Teacher(model=model, tokenizer=tokenizer, source=name)


def _load_teacher_model(source: str, dtype: torch.dtype) -> tuple[nn.Module, str | None]:
    from zoo.hf_import import SHORT_NAMES, from_hf

    path = Path(source).expanduser()
    if source in SHORT_NAMES or path.suffix == ".gguf":
        model = from_hf(source, dtype=dtype)
        spec = None
        if model.tokenizer is not None:
            key = source if source in SHORT_NAMES else hashlib.sha256(
                str(path.resolve()).encode()).hexdigest()[:16]
            spec = _save_tokenizer(model.tokenizer, key)
        return model, spec
    if not path.exists():
        raise RunConfigError(
            f"teacher.source={source!r} is not a local path nor a short name "
            f"({', '.join(sorted(SHORT_NAMES))}); zoo downloads nothing"
        )
    if (path / "final" / "config.json").exists():  # a `zoo train` output folder
        run = yaml.safe_load((path / "run.yaml").read_text()) if (
            path / "run.yaml").exists() else None
        model = ZooForCausalLM.from_pretrained(path / "final", dtype=dtype)
        return model, _zoo_run_tokenizer(run) or _dir_tokenizer(path / "final")
    if (path / "state.json").exists():  # a `zoo train` checkpoint folder
        state = read_state(path)
        config = ZooConfig(**{k: v for k, v in state["model_config"].items()
                              if k in {f.name for f in dataclasses.fields(ZooConfig)}})
        checkpoint = load_checkpoint(path, config)
        model = ZooForCausalLM(config)
        model.load_state_dict(checkpoint.model)
        return model.to(dtype), _zoo_run_tokenizer(checkpoint.run_config)
    config_file = path / "config.json"
    if not config_file.exists():
        raise RunConfigError(
            f"teacher.source={source!r} holds no config.json: not a model directory, a `zoo "
            "train` output folder (final/) or a checkpoint (state.json)"
        )
    if json.loads(config_file.read_text()).get("model_type") == "zoo":
        return ZooForCausalLM.from_pretrained(path, dtype=dtype), _dir_tokenizer(path)
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    tokenizer = _dir_tokenizer(path)
    if hf_model.config.model_type == "llama":
        # zoo's equal-logit copy: its recurrent cache for seq-KD, hooks for linearisation
        return from_hf(hf_model, dtype=dtype), tokenizer
    return hf_model, tokenizer


def _dir_tokenizer(folder: Path) -> str | None:
    return str(folder) if has_tokenizer_files(folder) else None


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    if a.fingerprint == b.fingerprint:
        return True
    return a.vocab_size == b.vocab_size and list(a.encode(PROBE)) == list(b.encode(PROBE))


def resolve_tokenizer(data: DataSection, teacher: Teacher) -> DataSection:
    """data with `tokenizer: teacher` replaced by the teacher's tokenizer; an explicit tokenizer
    must be the teacher's own (same vocabulary and encodings), or the run is refused."""
    spec = data.tokenizer
    if spec == "teacher":
        if teacher.tokenizer is None:
            raise RunConfigError(
                f"data.tokenizer='teacher': the teacher {teacher.source!r} carries no tokenizer "
                "(no tokenizer files beside it); set data.tokenizer to its tokenizer directory"
            )
        return dataclasses.replace(data, tokenizer=teacher.tokenizer)
    if teacher.tokenizer is not None and teacher.tokenizer != spec:
        mine, theirs = load_tokenizer(spec), load_tokenizer(teacher.tokenizer)
        if not same_tokenizer(mine, theirs):
            raise RunConfigError(
                f"data.tokenizer={spec!r} (vocab {mine.vocab_size}) is not the teacher's "
                f"tokenizer {teacher.tokenizer!r} (vocab {theirs.vocab_size}): teacher and "
                "student must share the tokenizer; use data.tokenizer=teacher"
            )
    return data


def check_vocabularies(teacher: Teacher, student: ZooForCausalLM,
                       tokenizer: Tokenizer | None) -> None:
    """Teacher and student logits must cover the same vocabulary, and the data's tokens must be
    ids both have."""
    if teacher.vocab_size != student.config.vocab_size:
        raise RunConfigError(
            f"vocabulary mismatch: the student has vocab_size={student.config.vocab_size} but "
            f"the teacher {teacher.source!r} has {teacher.vocab_size}; teacher and student must "
            "share the tokenizer (set student.overrides.vocab_size="
            f"{teacher.vocab_size}, or linearise the teacher)"
        )
    if tokenizer is not None and tokenizer.vocab_size > teacher.vocab_size:
        raise RunConfigError(
            f"vocabulary mismatch: data.tokenizer has {tokenizer.vocab_size} tokens, more than "
            f"the teacher's vocab_size={teacher.vocab_size}: it is not the teacher's tokenizer"
        )


def build_student(run: DistillRunConfig, teacher: Teacher) -> ZooForCausalLM:
    s = run.student
    if s.linearize is not None:
        if not teacher.is_zoo:
            # a Llama-layout transformers teacher was converted on load; others cannot be
            raise RunConfigError(
                f"student.linearize: the teacher {teacher.source!r} is a "
                f"{type(teacher.model).__name__}, not an attention model zoo can convert "
                "(Llama layout); distil it into student.config instead"
            )
        try:
            return linearize(teacher.model, s.linearize["mixer"],
                             s.linearize.get("keep_attention", []))
        except (ValueError, ConfigError) as error:
            raise RunConfigError(f"student.linearize: {error}") from None
    try:
        config = load_config(s.config, **dict(s.overrides))
    except (ConfigError, FileNotFoundError) as error:
        raise RunConfigError(f"student (config {s.config!r}): {error}") from None
    return ZooForCausalLM(config)


# ---------------------------------------------------------------------------------------------
# The teacher-logits cache


class TeacherLogitsCache:
    """Per training window: the teacher's top-k (or full) logits, as float16 memmaps.

    <root>/<key>/values.f16 (N, T, k), indices.bin (N, T, k) (absent when full), filled.u8 (N,),
    meta.json. Windows are filled lazily and flushed as they are written; `filled` is set only
    after a window's values are written, so a killed run leaves no half-filled window marked.
    """

    def __init__(self, root: Path, key_parts: Mapping[str, Any], num_windows: int, seq_len: int,
                 top_k: int, vocab_size: int):
        key = hashlib.sha256(json.dumps(dict(key_parts), sort_keys=True).encode()).hexdigest()
        self.folder = root / key[:24]
        self.folder.mkdir(parents=True, exist_ok=True)
        self.top_k = top_k
        width = top_k or vocab_size
        shape = (num_windows, seq_len, width)
        meta = {**key_parts, "shape": list(shape), "full": top_k == 0}
        meta_file = self.folder / "meta.json"
        if not meta_file.exists():
            meta_file.write_text(json.dumps(meta, indent=1))
        self.values = self._open("values.f16", np.float16, shape)
        self.indices = None
        if top_k:
            index_dtype = np.uint16 if vocab_size <= 2**16 else np.int32
            self.indices = self._open("indices.bin", index_dtype, shape)
        self.filled = self._open("filled.u8", np.uint8, (num_windows,))

    def _open(self, name: str, dtype: Any, shape: tuple[int, ...]) -> np.memmap:
        path = self.folder / name
        mode = "r+" if path.exists() else "w+"  # w+ creates a sparse, zero-filled file
        return np.memmap(path, dtype=dtype, mode=mode, shape=shape)

    @property
    def filled_fraction(self) -> float:
        return float(self.filled.mean())

    def get(self, windows: np.ndarray, compute) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The teacher logits of `windows` (full (B, T, V) or (indices, values) (B, T, k));
        compute(missing_rows) -> logits (b, T, V) fills the windows not cached yet."""
        missing = [i for i, w in enumerate(windows) if not self.filled[w]]
        if missing:
            logits = compute(missing).float()
            if self.top_k:
                values, indices = logits.topk(self.top_k, dim=-1)
            else:
                values, indices = logits, None
            for row, i in enumerate(missing):
                w = windows[i]
                self.values[w] = values[row].cpu().numpy().astype(np.float16)
                if indices is not None:
                    self.indices[w] = indices[row].cpu().numpy().astype(self.indices.dtype)
            self.values.flush()
            if self.indices is not None:
                self.indices.flush()
            self.filled[[windows[i] for i in missing]] = 1
            self.filled.flush()
        values = torch.from_numpy(np.stack([self.values[w] for w in windows]).astype(np.float32))
        if not self.top_k:
            return values
        indices = torch.from_numpy(np.stack([self.indices[w] for w in windows]).astype(np.int64))
        return indices, values


# ---------------------------------------------------------------------------------------------
# Sequence-level KD: sampling from the teacher


@torch.no_grad()
def teacher_generate(teacher: Teacher, prompts: torch.Tensor, length: int, *,
                     temperature: float = 1.0, generator: torch.Generator | None = None
                     ) -> torch.Tensor:
    """Continue prompts (B, P) to (B, length) tokens by sampling from the teacher (greedy at
    temperature 0). Zoo teachers decode through their recurrent cache (one token per step);
    others through transformers' generate()."""
    new = length - prompts.shape[1]
    if new <= 0:
        return prompts[:, :length]
    if not teacher.is_zoo:
        out = teacher.model.generate(
            prompts, max_new_tokens=new, min_new_tokens=new, do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None, top_k=0, top_p=1.0,
            pad_token_id=0)
        return out[:, :length]
    model: ZooForCausalLM = teacher.model
    out = model(input_ids=prompts, use_cache=True, logits_to_keep=1)
    cache, logits = out.cache, out.logits[:, -1]
    tokens = [prompts]
    for step in range(new):
        if temperature > 0:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator)
        else:
            token = logits.argmax(-1, keepdim=True)
        tokens.append(token)
        if step + 1 < new:
            out = model(input_ids=token, cache=cache, use_cache=True)
            cache, logits = out.cache, out.logits[:, -1]
    return torch.cat(tokens, dim=1)


# ---------------------------------------------------------------------------------------------
# Evaluation helpers


@torch.no_grad()
def perplexity(model: nn.Module, batches: Sequence[torch.Tensor], *,
               progress: bool = False, desc: str = "perplexity") -> dict[str, float]:
    """Next-token loss and perplexity of `model` over id batches (B, T), every position scored
    after the first of each window."""
    model.eval()
    total, count = 0.0, 0
    for ids in tqdm(batches, desc=desc, disable=not progress, leave=False):
        logits = model(input_ids=ids, use_cache=False).logits
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        total += float(ce)
        count += ids[:, 1:].numel()
    loss = total / max(count, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 80.0)), "val_tokens": count}


# ---------------------------------------------------------------------------------------------
# The distillation loop


class Distiller:
    """Builds teacher, student, data and optimizer from a DistillRunConfig; `fit()` runs stage 1
    (attention transfer, linearised students with transfer.steps > 0) and stage 2 (KD).

    teacher: an already-loaded Teacher (or model) to use instead of run.teacher.source (the
    demo and tests pass one to avoid loading it twice).
    """

    def __init__(self, run: DistillRunConfig, *, resume: bool = False, overwrite: bool = False,
                 progress: bool = True, teacher: Teacher | nn.Module | None = None):
        self.run = run.check()
        self.progress = progress
        if run.train.threads:
            torch.set_num_threads(run.train.threads)
        device = run.train.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.out_dir = Path(run.out_dir)
        resume_from = self._prepare_out_dir(resume, overwrite)
        self.metrics = MetricsLog(self.out_dir)

        if teacher is None:
            tqdm.write(f"loading teacher {run.teacher.source!r}")
            teacher = load_teacher(run.teacher.source, run.teacher.dtype)
        elif not isinstance(teacher, Teacher):
            teacher = load_teacher(teacher)
        self.teacher = teacher
        self.teacher.model.to(self.device)
        seed_everything(run.train.seed)
        self.student = build_student(run, teacher).to(self.device)
        self.report = getattr(self.student, "linearization", None)
        self.data = resolve_tokenizer(run.data, teacher)
        check_vocabularies(teacher, self.student, None)
        self.dataset, self.tokenizer = build_dataset(
            self.data, run.train.seq_len, run.train.seed, self.student.config.vocab_size,
            progress=progress)
        check_vocabularies(teacher, self.student, self.tokenizer)
        if not isinstance(self.dataset, PackedTextDataset) and (
                run.distill.teacher_logits == "cache"):
            raise RunConfigError("distill.teacher_logits=cache needs data.source=text")
        d = run.distill
        self.layer_map = None
        self.projection = None
        if d.hidden > 0:
            try:
                self.layer_map = L.parse_layer_map(
                    d.layer_map, self.student.config.n_layers, teacher.n_layers)
            except ValueError as error:
                raise RunConfigError(str(error)) from None
            self.projection = L.HiddenProjection(
                self.layer_map, self.student.config.d_model, teacher.d_model).to(self.device)
        self.logits_cache = None
        if d.teacher_logits == "cache":
            root = Path(d.cache_dir).expanduser() if d.cache_dir else (
                default_cache_dir().parent / "teacher_logits")
            self.logits_cache = TeacherLogitsCache(
                root, {"teacher": teacher.fingerprint(), "tokens": self.dataset.cache.folder.name,
                       "seq_len": run.train.seq_len, "top_k": d.cache_top_k,
                       "dtype": run.teacher.dtype},
                self.dataset.num_train, run.train.seq_len, d.cache_top_k, teacher.vocab_size)
        self.step = 0
        self.samples_seen = 0
        self.transfer_done = False
        self.resume_from = resume_from
        self.n_params = sum(p.numel() for p in self.student.parameters())  # without adapters
        self.lora = None if d.lora is None else LoraSpec.from_dict(d.lora)
        self.adapters: list[str] = []  # the LoRA adapters' parameter names, once added
        self._checkpoint = load_checkpoint(resume_from, self.student.config) if (
            resume_from is not None) else None
        if self._checkpoint is not None:
            weights = self._checkpoint.model
            student_weights = {k: v for k, v in weights.items()
                               if not k.startswith(PROJECTION_PREFIX)}
            if self.lora is not None:
                self._add_lora()  # a stage-2 checkpoint holds the adapters, unmerged
            try:
                check_model_tensors(resume_from, student_weights, self.student.state_dict())
            except CheckpointError as error:
                raise CheckpointError(f"{error} (distill.lora={d.lora!r}: was it changed since "
                                      "the checkpoint?)") from None
            self.student.load_state_dict(student_weights)
            if self.projection is not None:
                self.projection.load_state_dict(
                    {k[len(PROJECTION_PREFIX):]: v for k, v in weights.items()
                     if k.startswith(PROJECTION_PREFIX)})
            self.transfer_done = True  # stage 1 is in the checkpointed weights
        elif self.lora is not None:
            self._add_lora(check_only=True)  # a bad target fails now, not after stage 1

    # -----------------------------------------------------------------------------------------

    def _prepare_out_dir(self, resume: bool, overwrite: bool) -> Path | None:
        holds_run = (self.out_dir / METRICS_FILE).exists() or (
            self.out_dir / "checkpoints").exists()
        if resume:
            found = latest_checkpoint(self.out_dir / "checkpoints")
            if found is None:
                raise CheckpointError(f"--resume: no checkpoint in {self.out_dir}/checkpoints")
            return found
        if holds_run and not overwrite:
            raise RunConfigError(
                f"out_dir={str(self.out_dir)!r} already holds a run; pass --resume, "
                "--overwrite, or --set out_dir=..."
            )
        if overwrite:
            for name in (METRICS_FILE, PLOT_FILE, SUMMARY_FILE):
                (self.out_dir / name).unlink(missing_ok=True)
            for name in ("checkpoints", "final"):
                shutil.rmtree(self.out_dir / name, ignore_errors=True)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "run.yaml").write_text(yaml.safe_dump(self.run.to_dict(), sort_keys=False))
        return None

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                              enabled=self.run.train.precision == "bfloat16")

    def _windows(self, positions: np.ndarray) -> np.ndarray:
        ds = self.dataset
        return np.array([ds.order(p // ds.num_train)[p % ds.num_train] for p in positions])

    def val_batches(self) -> list[torch.Tensor]:
        t = self.run.train
        total = min(t.eval_batches * t.batch_size, self.dataset.num_val)
        step = max(1, t.batch_size // self.run.optim.grad_accum)
        return [self.dataset.val_batch(np.arange(i, min(i + step, total)))[0].to(self.device)
                for i in range(0, total, step)]

    # -----------------------------------------------------------------------------------------
    # stage 1

    def transfer(self) -> dict[str, Any] | None:
        """Attention transfer (stage 1); None when it does not apply or already ran."""
        t, report = self.run.transfer, self.report
        if report is None or t.steps == 0 or self.transfer_done:
            return None
        seq_len = t.seq_len or self.run.train.seq_len
        dataset = self.dataset
        if seq_len != self.run.train.seq_len:
            dataset = PackedTextDataset(self.dataset.cache, seq_len, self.run.train.seed + 1,
                                        self.dataset.vocab_size)

        def batch(step: int) -> torch.Tensor:
            first = step * t.batch_size
            return dataset.train_batch(np.arange(first, first + t.batch_size))[0]

        eval_ids = dataset.val_batch(np.arange(min(t.batch_size, dataset.num_val)))[0]
        start = time.perf_counter()

        def log(record: dict[str, Any]) -> None:
            self.metrics.write({"kind": "transfer", "step": record["step"],
                                "loss": record["loss"],
                                "layers": {str(k): v for k, v in record["layers"].items()}})

        result = attention_transfer(
            self.teacher.model, self.student, batch, steps=t.steps, lr=t.lr,
            eval_ids=eval_ids, progress=self.progress, log=log)
        seconds = time.perf_counter() - start
        summary = {
            "kind": "transfer_end", "steps": result.steps, "seconds": seconds,
            "trained_parameters": len(result.trained_parameters),
            "mse_before": {str(k): v for k, v in result.before.items()},
            "mse_after": {str(k): v for k, v in result.after.items()},
            "tokens": result.steps * t.batch_size * seq_len,
        }
        self.metrics.write(summary)
        self.transfer_done = True
        if not result.trained_parameters:
            tqdm.write("attention transfer: the replacement mixer has no new parameters "
                       "(everything was copied); nothing to train in stage 1")
        else:
            mean = lambda d: sum(d.values()) / max(len(d), 1)  # noqa: E731
            tqdm.write(f"attention transfer: {result.steps} steps in {seconds:.0f} s, mean "
                       f"per-layer MSE {mean(result.before):.4g} -> {mean(result.after):.4g}")
        return summary

    # -----------------------------------------------------------------------------------------
    # stage 2

    def _add_lora(self, check_only: bool = False) -> None:
        """LoRA adapters on the replaced layers (or distill.lora.layers), after stage 1."""
        try:
            if check_only:
                check_lora(self.student, self.lora, layers=self.report.replaced)
            else:
                self.adapters = add_lora(self.student, self.lora, layers=self.report.replaced)
        except ValueError as error:
            raise RunConfigError(f"distill.{error}") from None

    def _set_trainable(self) -> list[nn.Parameter]:
        d, report = self.run.distill, self.report
        mode = d.trainable or ("adapters" if d.lora is not None else "all")
        if mode == "all":
            names = None
        elif mode == "adapters":
            names = set()
        elif mode == "new":
            names = set(report.new_parameters(self.student))
        else:  # mixers of the replaced layers
            prefixes = tuple(f"model.layers.{i}.mixer." for i in report.replaced)
            names = {n for n, _ in self.student.named_parameters() if n.startswith(prefixes)}
        if self.adapters:
            # the adapted projections' own weights stay as they are; their adapters train
            names = (names - set(adapted_base_parameter_names(self.student))) | set(self.adapters)
        for name, p in self.student.named_parameters():
            p.requires_grad_(names is None or name in names)
        params = [p for p in self.student.parameters() if p.requires_grad]
        if self.projection is not None:
            params += list(self.projection.parameters())
        if not params:
            raise RunConfigError(f"distill.trainable={mode!r} leaves no parameter to train")
        return params

    def _teacher_logits(self, ids: torch.Tensor, windows: np.ndarray | None, hidden: bool):
        if self.logits_cache is not None and windows is not None:
            def compute(rows):
                with self.autocast():
                    return self.teacher.forward(ids[rows])[0]

            cached = self.logits_cache.get(windows, compute)
            if isinstance(cached, tuple):
                return tuple(c.to(self.device) for c in cached), None
            return cached.to(self.device), None
        with self.autocast():
            return self.teacher.forward(ids, hidden=hidden)

    def loss(self, ids: torch.Tensor, labels: torch.Tensor, windows: np.ndarray | None = None
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted distillation loss of one micro-batch and its parts."""
        d = self.run.distill
        need_hidden = d.hidden > 0
        parts: dict[str, torch.Tensor] = {}
        needs_logits = d.forward_kl > 0 or d.reverse_kl > 0 or need_hidden
        teacher_logits = teacher_hidden = None
        if needs_logits:
            teacher_logits, teacher_hidden = self._teacher_logits(ids, windows, need_hidden)
        with self.autocast():
            out = self.student(input_ids=ids, use_cache=False, output_hidden_states=need_hidden)
        mask = None
        if d.forward_kl > 0:
            parts["forward_kl"] = L.forward_kl(out.logits, teacher_logits,
                                               temperature=d.temperature, mask=mask)
        if d.reverse_kl > 0:
            parts["reverse_kl"] = L.reverse_kl(out.logits, teacher_logits,
                                               temperature=d.temperature, mask=mask)
        if d.ce > 0:
            parts["ce"] = L.cross_entropy(out.logits, labels)
        if need_hidden:
            parts["hidden"] = L.hidden_mse(out.hidden_states, teacher_hidden, self.projection)
        if out.aux_loss is not None:
            parts["aux"] = out.aux_loss.float()
        if d.seq_kd > 0:
            generated = teacher_generate(
                self.teacher, ids[:, : d.seq_kd_prompt_tokens], ids.shape[1],
                temperature=d.seq_kd_temperature)
            seq_labels = generated.clone()
            seq_labels[:, : d.seq_kd_prompt_tokens] = IGNORE
            with self.autocast():
                seq_logits = self.student(input_ids=generated, use_cache=False).logits
            parts["seq_kd"] = L.cross_entropy(seq_logits, seq_labels)
        weights = {name: getattr(d, name) for name in LOSS_FIELDS} | {"aux": 1.0}
        total = sum(weights[name] * value for name, value in parts.items())
        return total, {name: float(value.detach()) for name, value in parts.items()}

    def train_step(self) -> dict[str, Any]:
        run = self.run
        accum = run.optim.grad_accum
        micro = run.train.batch_size // accum
        self.student.train()
        totals: dict[str, float] = {}
        loss_sum = 0.0
        for m in range(accum):
            first = self.samples_seen + m * micro
            positions = np.arange(first, first + micro)
            ids, labels = self.dataset.train_batch(positions)
            windows = self._windows(positions) if self.logits_cache is not None else None
            loss, parts = self.loss(ids.to(self.device), labels.to(self.device), windows)
            (loss / accum).backward()
            loss_sum += float(loss.detach()) / accum
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v / accum
        max_norm = run.optim.grad_clip if run.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.samples_seen += run.train.batch_size
        return {"loss": loss_sum, **totals, "lr": lr, "grad_norm": float(grad_norm)}

    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        model = self.student if model is None else model
        with self.autocast():
            result = perplexity(model, self.val_batches())
        self.student.train()
        return result

    def _param_names(self) -> list[str]:
        """The optimizer's parameters in its own order, by name (student + projections)."""
        names = {id(p): n for n, p in self.student.named_parameters()}
        if self.projection is not None:
            names.update({id(p): f"{PROJECTION_PREFIX}{n}"
                          for n, p in self.projection.named_parameters()})
        return [names[id(p)] for g in self.optimizer.param_groups for p in g["params"]]

    def _optimizer_state(self) -> dict[str, Any]:
        """optimizer.state_dict() keyed by parameter name (what checkpoint.py stores)."""
        names = self._param_names()
        state = self.optimizer.state_dict()
        return {"state": {names[i]: v for i, v in state["state"].items()},
                "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                 for g in state["param_groups"]]}

    def _load_optimizer_state(self, saved: dict[str, Any]) -> None:
        index = {n: i for i, n in enumerate(self._param_names())}
        missing = sorted(set(saved["state"]) - set(index))
        if missing:
            raise CheckpointError(f"optimizer state names parameters this run does not train: "
                                  f"{missing[:3]} (distill.trainable changed?)")
        self.optimizer.load_state_dict({
            "state": {index[n]: v for n, v in saved["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                             for g in saved["param_groups"]]})

    def save(self) -> Path:
        model_state = dict(self.student.state_dict())
        if self.projection is not None:
            model_state.update({f"{PROJECTION_PREFIX}{k}": v
                                for k, v in self.projection.state_dict().items()})
        path = save_checkpoint(
            self.out_dir, self.step, model=model_state, optimizer=self._optimizer_state(),
            scheduler=self.scheduler.state_dict(),
            train_state={"samples_seen": self.samples_seen,
                         "tokens_seen": self.samples_seen * self.run.train.seq_len},
            model_config=self.student.config, run_config=self.run.to_dict(),
            keep_last=self.run.checkpoint.keep_last)
        self.metrics.write({"kind": "checkpoint", "step": self.step, "path": str(path)})
        return path

    def fit(self) -> dict[str, Any]:
        """Stage 1 (when configured), then `train.steps` KD steps; returns a summary that is
        also written to `<out_dir>/summary.json`."""
        run, t = self.run, self.run.train
        start = time.perf_counter()
        tqdm.write(self.describe())
        if self.report is not None:
            tqdm.write(self.report.summary())
        self.metrics.write({"kind": "start" if self._checkpoint is None else "resume",
                            "step": self.step, "parameters": self.n_params})
        teacher_eval = self.evaluate(self.teacher.model)
        self.metrics.write({"kind": "teacher_eval", "step": 0, **teacher_eval})
        tqdm.write(f"teacher: val loss {teacher_eval['val_loss']:.4f}, "
                   f"ppl {teacher_eval['val_ppl']:.3f}")
        transfer_seconds = 0.0
        transfer = None
        if self._checkpoint is None:
            linearised_eval = self.evaluate()
            self.metrics.write({"kind": "eval", "step": 0, **linearised_eval, "tokens": 0,
                                "stage": "initial"})
            t0 = time.perf_counter()
            transfer = self.transfer()
            transfer_seconds = time.perf_counter() - t0
            if transfer is not None:
                after = self.evaluate()
                self.metrics.write({"kind": "eval", "step": 0, **after, "tokens": 0,
                                    "stage": "after_transfer"})
                transfer["val_ppl_after"] = after["val_ppl"]
                transfer["val_ppl_before"] = linearised_eval["val_ppl"]
        if self.lora is not None and not self.adapters:
            self._add_lora()
        self.params = self._set_trainable()
        optim_run = RunConfig(optim=run.optim, train=run.train)
        self.optimizer = build_optimizer(_ParamsOnly(self.params), optim_run)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: warmup_cosine(
                step, warmup=run.optim.warmup_steps, total=t.steps,
                min_ratio=run.optim.min_lr_ratio))
        if self._checkpoint is not None:
            ck = self._checkpoint
            self._load_optimizer_state(ck.optimizer)
            self.scheduler.load_state_dict(dict(ck.scheduler, lr_lambdas=[None]))
            self.step = ck.step
            self.samples_seen = int(ck.train_state["samples_seen"])
            self.metrics.truncate_after(self.step)
            restore_rng(ck.rng)  # LoRA dropout and seq-KD sampling continue as they would have
        bar = tqdm(total=t.steps, initial=self.step, desc=f"{run.name} (KD)", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        kd_start = time.perf_counter()
        last_eval: dict[str, float] = {}
        while self.step < t.steps:
            record = self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            now = time.perf_counter()
            if self.step % t.log_interval == 0 or self.step == t.steps:
                self.metrics.write({"kind": "train", "step": self.step, **record,
                                    "tokens": self.samples_seen * t.seq_len,
                                    "elapsed_s": now - start})
            if t.eval_interval and self.step % t.eval_interval == 0 and self.step < t.steps:
                last_eval = self.evaluate()
                self.metrics.write({"kind": "eval", "step": self.step, **last_eval,
                                    "tokens": self.samples_seen * t.seq_len})
            if (run.checkpoint.interval and self.step % run.checkpoint.interval == 0
                    and self.step < t.steps):
                self.save()
        bar.close()
        kd_seconds = time.perf_counter() - kd_start
        last_eval = self.evaluate()
        self.metrics.write({"kind": "eval", "step": self.step, **last_eval,
                            "tokens": self.samples_seen * t.seq_len})
        checkpoint = self.save()
        if self.adapters:
            merge_lora(self.student)  # final/ is a plain zoo model: merged, original keys
            self.adapters = []
        final = save_final(ZooForCausalLM, self.student.config, self.student.state_dict(),
                           self.out_dir / "final")
        if self.data.tokenizer not in ("byte",) and Path(self.data.tokenizer).is_dir():
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(self.data.tokenizer, local_files_only=True
                                          ).save_pretrained(final)
        seconds = time.perf_counter() - start
        self.metrics.write({"kind": "end", "step": self.step, "seconds": seconds})
        summary = {
            "name": run.name, "teacher": self.teacher.source,
            "student": self.student.config.describe_layers(),
            "student_parameters": self.n_params,
            "linearization": None if self.report is None else {
                "replaced": self.report.replaced, "kept": self.report.kept,
                "mixer": self.report.mixer, "copied": len(self.report.copied),
                "new": len(self.report.new)},
            "teacher_val_loss": teacher_eval["val_loss"],
            "teacher_val_ppl": teacher_eval["val_ppl"],
            "student_val_loss": last_eval["val_loss"], "student_val_ppl": last_eval["val_ppl"],
            "val_tokens": last_eval["val_tokens"],
            "transfer": transfer, "transfer_seconds": transfer_seconds,
            "lora": None if self.lora is None else self.lora.to_dict(),
            "kd_steps": self.step, "kd_seconds": kd_seconds,
            "kd_tokens": self.samples_seen * t.seq_len,
            "tokens_seen": self.samples_seen * t.seq_len + (transfer or {}).get("tokens", 0),
            "seconds": seconds, "checkpoint": str(checkpoint), "final": str(final),
        }
        summary["plot"] = str(plot_distill(self.out_dir))
        (self.out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
        return summary

    def describe(self) -> str:
        run, t = self.run, self.run.train
        meta = self.dataset.cache.meta if hasattr(self.dataset, "cache") else {}
        tokens = t.steps * t.batch_size * t.seq_len
        loss_text = ", ".join(f"{f} {getattr(run.distill, f):g}" for f in LOSS_FIELDS
                              if getattr(run.distill, f) > 0)
        return (f"{run.name}: teacher {self.teacher.source} -> student "
                f"({self.n_params:,} parameters) on {meta.get('train_tokens', 0):,} training "
                f"tokens (tokenizer {self.data.tokenizer}); losses {loss_text}, T "
                f"{run.distill.temperature:g}, teacher logits {run.distill.teacher_logits}; "
                f"{t.steps} KD steps x {t.batch_size} x {t.seq_len} = {tokens:,} tokens on "
                f"{self.device.type}")


class _ParamsOnly(nn.Module):
    """Hands build_optimizer exactly the trainable parameters (student + projections)."""

    def __init__(self, params: list[nn.Parameter]):
        super().__init__()
        self._params = params

    def parameters(self, recurse: bool = True):
        return iter(self._params)


# ---------------------------------------------------------------------------------------------
# Plots and reports


def plot_distill(run_dir: Path, title: str | None = None) -> Path:
    """`<run>/distill.png`: stage-1 mean MSE per step (left), KD loss and its parts per step
    with validation loss of the student and the teacher's as a line (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    transfer = [(r["step"], r["loss"]) for r in records if r.get("kind") == "transfer"]
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    teacher = [r for r in records if r.get("kind") == "teacher_eval"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    if transfer:
        ax.plot(*zip(*transfer), color="tab:purple")
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no attention transfer", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_title("stage 1: attention transfer (mean per-layer MSE)")
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    ax = axes[1]
    if train:
        steps = [r["step"] for r in train]
        ax.plot(steps, [r["loss"] for r in train], color="tab:blue", alpha=0.6,
                label="KD loss (weighted)")
        for part, color in zip(LOSS_FIELDS, ("tab:cyan", "tab:olive", "tab:gray", "tab:pink",
                                             "tab:brown")):
            if part in train[0] and len(
                    [f for f in LOSS_FIELDS if f in train[0]]) > 1:
                ax.plot(steps, [r.get(part, float("nan")) for r in train], color=color,
                        alpha=0.6, label=part)
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], color="tab:orange",
                marker="o", label="student val loss")
    if teacher:
        ax.axhline(teacher[-1]["val_loss"], color="tab:green", linestyle="--",
                   label=f"teacher val loss ({teacher[-1]['val_loss']:.3f})")
    ax.set_xlabel("KD step")
    ax.set_ylabel("nats / token")
    ax.set_title("stage 2: knowledge distillation")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(title or Path(run_dir).name)
    fig.tight_layout()
    path = Path(run_dir) / PLOT_FILE
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = [
    "DistillRunConfig", "Distiller", "Teacher", "TeacherLogitsCache", "distill_config_from_dict",
    "load_distill_config",
    "load_teacher", "perplexity", "plot_distill", "teacher_generate",
]
