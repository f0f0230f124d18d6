"""Linearisation: a softmax-attention teacher into a student of the same shape whose attention
layers are replaced by an efficient mixer, then attention transfer (stage 1).

    student = linearize(teacher, mixer={"type": "linear_attention", "feature_map": "hedgehog"},
                        keep_attention=[0, 15])
    print(student.linearization.summary())     # what was copied, what is new
    attention_transfer(teacher, student, batches, steps=100)

The student is a `ZooForCausalLM` built from the teacher's config with the replaced layers'
mixer swapped (kept layers through the config's per-layer overrides, so a hybrid saves and loads
like any zoo model). Every student tensor whose name and shape the teacher also has is copied:
embeddings, norms, FFNs, the head, and the q/k/v/o projections of mixers that name them as
attention does (linear attention); everything else (Hedgehog's feature maps, RetNet's gate,
a projection whose shape differs) keeps its fresh initialisation and is reported as new.
A Mamba-2 replacement ("mamba2") takes its shape from the teacher's attention and is filled from
it under other names after Mamba-in-Llama (q -> C, k -> B, v -> x, o -> out_proj; the mapping and
what stays fresh: `zoo.train.mamba_init`); the report's `sources` names where each came from.

Stage 1 follows LoLCATs (Zhang et al. 2024, "attention transfer"): each replaced layer's mixer
is trained to reproduce the teacher attention's output, by MSE, on the teacher's own normed
inputs to that layer (captured by hooks), with only the new parameters trainable. Because every
layer sees the teacher's inputs, the layers are trained independently of each other's errors.
Stage 2 (end-to-end KD of the whole student) is `zoo.train.distill`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from zoo.config import ZooConfig
from zoo.layers import MIXERS, options_of
from zoo.model import ZooForCausalLM
from zoo.train.mamba_init import MappedTensor, mamba2_from_attention, mamba2_spec_from_attention

ATTENTION = "attention"
# Options a replacement mixer inherits from the teacher's attention when it accepts them and
# the caller did not set them: the head layout decides whether q/k/v/o can be copied, and the
# rotary base whether the student's q and k carry the positions the teacher's softmax saw (the
# teacher's effective base: Attention's default where its spec leaves rope_theta out).
INHERITED_OPTIONS = ("n_heads", "n_kv_heads", "qkv_bias", "rope_theta")


@dataclasses.dataclass
class LinearizeReport:
    """What `linearize` did: layer lists and the student's tensors split by origin."""

    replaced: list[int]  # layers whose attention was replaced
    kept: list[int]  # attention layers kept as they are (hybrid)
    copied: list[str]  # student state-dict names copied from the teacher
    new: list[str]  # student state-dict names freshly initialised
    mixer: dict[str, Any]  # the replacement spec (after inheriting the teacher's heads)
    # student tensors filled from teacher tensors of other names (Mamba-2's in_proj from q/k/v):
    # the teacher's names; one listed in `new` too was filled in part, its other rows fresh
    sources: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def new_parameters(self, model: nn.Module) -> list[str]:
        """Names of the student's parameters that were not copied (the stage-1 trainables)."""
        new = set(self.new)
        return [name for name, _ in model.named_parameters() if name in new]

    def summary(self) -> str:
        def group(names: list[str]) -> str:
            # model.layers.3.mixer.q_proj.weight -> mixer.q_proj.weight (per-layer names once)
            kinds: dict[str, int] = {}
            for name in names:
                parts = name.split(".")
                key = ".".join(parts[3:]) if parts[:2] == ["model", "layers"] else name
                kinds[key] = kinds.get(key, 0) + 1
            return ", ".join(f"{k} x{n}" if n > 1 else k for k, n in sorted(kinds.items()))

        return (
            f"replaced {len(self.replaced)} attention layer(s) {self.replaced} by "
            f"{json.dumps(self.mixer)}; kept attention at {self.kept}\n"
            f"copied from the teacher ({len(self.copied)} tensors): {group(self.copied)}\n"
            f"new ({len(self.new)} tensors): {group(self.new) or 'none'}"
            + self._sources_line()
        )

    def _sources_line(self) -> str:
        """The mapped tensors, once per kind: "in_proj.weight <- q_proj.weight, ... x2"."""
        if not self.sources:
            return ""
        new = set(self.new)
        kinds: dict[str, int] = {}
        for name, sources in self.sources.items():
            local = [s.rsplit(".mixer.", 1)[-1] for s in sources]
            key = (f"{name.rsplit('.mixer.', 1)[-1]} <- {', '.join(local)}"
                   + (" (in part; the rest fresh, trained as new)" if name in new else ""))
            kinds[key] = kinds.get(key, 0) + 1
        listed = "; ".join(f"{k} x{n}" if n > 1 else k for k, n in kinds.items())
        return f"\nmapped from the teacher's attention under other names: {listed}"


def as_zoo_teacher(teacher: Any) -> ZooForCausalLM:
    """A zoo model from a zoo model, a Llama-layout transformers model, or a path / short name
    that `zoo.from_hf` or `ZooForCausalLM.from_pretrained` reads."""
    if isinstance(teacher, ZooForCausalLM):
        return teacher
    from zoo.hf_import import from_hf, is_hf_source

    if isinstance(teacher, (str, Path)):
        path = Path(teacher)
        if not is_hf_source(str(teacher)) and (path / "config.json").exists():
            return ZooForCausalLM.from_pretrained(path)
    # transformers' model objects and HF sources: from_hf refuses layouts it cannot map, by name
    return from_hf(teacher)


def _replacement_spec(mixer: str | Mapping[str, Any], teacher_attention: dict) -> dict:
    spec = {"type": mixer} if isinstance(mixer, str) else dict(mixer)
    if "type" not in spec:
        raise ValueError(f"linearize: mixer={mixer!r} must name a 'type' (one of {sorted(MIXERS)})")
    if spec["type"] not in MIXERS:
        raise ValueError(
            f"linearize: mixer.type={spec['type']!r} is not registered; allowed: {sorted(MIXERS)}"
        )
    accepted = options_of(MIXERS[spec["type"]])
    # a spec without rope_theta rotates with Attention's default base, which a student whose
    # own default is no rotation (linear attention) would otherwise not inherit
    teacher = {"rope_theta": options_of(MIXERS[ATTENTION])["rope_theta"], **teacher_attention}
    for option in INHERITED_OPTIONS:
        if option in accepted and option not in spec and option in teacher:
            spec[option] = teacher[option]
    return spec


def _check_keep(keep_attention: Iterable[int], attention_layers: list[int], n_layers: int
                ) -> list[int]:
    keep = []
    for index in keep_attention:
        if not isinstance(index, int) or isinstance(index, bool):
            raise ValueError(f"linearize: keep_attention entry {index!r} must be a layer index")
        resolved = index + n_layers if index < 0 else index
        if not 0 <= resolved < n_layers:
            raise ValueError(
                f"linearize: keep_attention entry {index} is outside 0..{n_layers - 1} (n_layers)"
            )
        if resolved not in attention_layers:
            raise ValueError(
                f"linearize: keep_attention entry {index}: the teacher's layer {resolved} is not "
                f"an attention layer (attention layers: {attention_layers})"
            )
        keep.append(resolved)
    return sorted(set(keep))


# Replacement mixers shaped after the teacher's attention and filled from its tensors under other
# names: type -> (derive the spec's shape from the teacher's attention spec and d_model, fill one
# layer's student mixer from the teacher's attention module).
ATTENTION_MAPPINGS: dict[str, tuple[Callable[..., dict], Callable[..., dict[str, MappedTensor]]]]
ATTENTION_MAPPINGS = {"mamba2": (mamba2_spec_from_attention, mamba2_from_attention)}


def _fit_to_attention(spec: dict, teacher_attention: dict, d_model: int) -> dict:
    """spec with the options a mapped replacement derives from the teacher's attention."""
    mapping = ATTENTION_MAPPINGS.get(spec["type"])
    return spec if mapping is None else mapping[0](spec, teacher_attention, d_model)


def _map_from_attention(teacher: ZooForCausalLM, student: ZooForCausalLM,
                        replaced: Sequence[int]) -> dict[str, MappedTensor]:
    """Fill each replaced layer whose mixer has a mapping from the teacher's attention there;
    returns what was filled, by full state-dict name, with full teacher names as sources."""
    mapped: dict[str, MappedTensor] = {}
    for i in replaced:
        mixer = student.model.layers[i].mixer
        mapping = ATTENTION_MAPPINGS.get(student.config.layer_spec(i)[0]["type"])
        if mapping is None:
            continue
        prefix = f"model.layers.{i}.mixer."
        for name, m in mapping[1](teacher.model.layers[i].mixer, mixer).items():
            mapped[prefix + name] = MappedTensor([prefix + s for s in m.sources], m.whole)
    return mapped


def student_config(teacher_config: ZooConfig, mixer: str | Mapping[str, Any],
                   keep_attention: Iterable[int] = ()) -> tuple[ZooConfig, LinearizeReport]:
    """The student's config: the teacher's, with every attention layer not in keep_attention
    replaced by `mixer` (inheriting the teacher's head layout where the mixer accepts it)."""
    n = teacher_config.n_layers
    specs = [teacher_config.layer_spec(i) for i in range(n)]
    attention_layers = [i for i, (m, _) in enumerate(specs) if m["type"] == ATTENTION]
    if not attention_layers:
        raise ValueError("linearize: the teacher has no attention layer to replace")
    keep = _check_keep(keep_attention, attention_layers, n)
    replaced = [i for i in attention_layers if i not in keep]
    replacement = None
    layer_specs = []
    for i, (m, f) in enumerate(specs):
        if i in replaced:
            spec = _fit_to_attention(_replacement_spec(mixer, m), m, teacher_config.d_model)
            # the first replaced layer's spec is the config's default; layers whose teacher
            # had another head layout become per-layer overrides below
            replacement = replacement or spec
            m = spec
        layer_specs.append((m, f))
    if replacement is None:  # every attention layer kept: the student is the teacher's shape
        first = specs[attention_layers[0]][0]
        replacement = _fit_to_attention(_replacement_spec(mixer, first), first,
                                        teacher_config.d_model)
    default = (replacement, teacher_config.ffn)
    if not replaced:
        default = (teacher_config.mixer, teacher_config.ffn)
    # Per-layer overrides for every layer that differs from the default, grouped by spec.
    groups: dict[str, dict] = {}
    for i, (m, f) in enumerate(layer_specs):
        if (m, f) == default:
            continue
        key = json.dumps([m, f], sort_keys=True)
        groups.setdefault(key, {"at": [], "mixer": m, "ffn": f})["at"].append(i)
    fields = teacher_config.to_dict()
    allowed = {f.name for f in dataclasses.fields(ZooConfig)}
    fields = {k: v for k, v in fields.items() if k in allowed}
    fields.update(mixer=copy.deepcopy(default[0]), ffn=copy.deepcopy(default[1]),
                  layers=list(groups.values()) or None)
    config = ZooConfig(**fields)
    report = LinearizeReport(replaced=replaced, kept=keep, copied=[], new=[], mixer=replacement)
    return config, report


@torch.no_grad()
def linearize(
    teacher: Any,
    mixer: str | Mapping[str, Any] = "linear_attention",
    keep_attention: Iterable[int] = (),
    *,
    dtype: torch.dtype = torch.float32,
) -> ZooForCausalLM:
    """A student ZooForCausalLM with the teacher's shape and its attention layers replaced.

    Args:
        teacher: a zoo attention model, a Llama-layout transformers model, or a path / short
            name ("smollm2-135m") that `zoo.from_hf` reads.
        mixer: the replacement, a registered mixer type or spec, e.g. {"type":
            "linear_attention", "feature_map": "hedgehog"}; n_heads / n_kv_heads / qkv_bias come
            from the teacher's attention when the mixer takes them and the spec leaves them out;
            "mamba2" derives expand, head_dim, d_state, n_groups and bias from it the same way,
            and a value the caller set that the mapping cannot use is a ValueError naming it.
        keep_attention: layer indices that stay softmax attention (a hybrid); negative indices
            count from the end.
    Returns:
        The student, in train mode off (eval), with `.linearization` (a LinearizeReport) and
        `.tokenizer` (the teacher's, when it has one).
    """
    teacher = as_zoo_teacher(teacher)
    config, report = student_config(teacher.config, mixer, keep_attention)
    student = ZooForCausalLM(config).to(dtype)
    source = teacher.state_dict()
    target = student.state_dict()
    copied, new = [], []
    for name, tensor in target.items():
        origin = source.get(name)
        if origin is not None and origin.shape == tensor.shape:
            tensor.copy_(origin.to(tensor.dtype))
            copied.append(name)
        else:
            new.append(name)
    mapped = _map_from_attention(teacher, student, report.replaced)
    whole = {name for name, m in mapped.items() if m.whole}
    done = set(copied) | whole
    report.copied = [name for name in target if name in done]
    report.new = [name for name in new if name not in whole]
    report.sources = {name: m.sources for name, m in mapped.items()}
    student.linearization = report
    student.tokenizer = getattr(teacher, "tokenizer", None)
    return student.eval()


# ---------------------------------------------------------------------------------------------
# Stage 1: attention transfer


class MixerIO:
    """Forward hooks recording each chosen block's mixer input (the normed hidden state) and
    output, detached: the teacher's side of attention transfer."""

    def __init__(self, model: ZooForCausalLM, layers: Sequence[int]):
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._handles = []
        for i in layers:
            mixer = model.model.layers[i].mixer
            self._handles.append(mixer.register_forward_hook(self._hook(i)))

    def _hook(self, index: int) -> Callable:
        def record(module, args, output):
            x = args[0] if args else None
            self.inputs[index] = x.detach()
            self.outputs[index] = output[0].detach()

        return record

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> MixerIO:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@torch.no_grad()
def teacher_mixer_io(teacher: ZooForCausalLM, ids: torch.Tensor, layers: Sequence[int]
                     ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """(inputs, outputs) of the teacher's mixers at `layers` for one batch of ids (B, T)."""
    with MixerIO(teacher, layers) as io:
        teacher(input_ids=ids, use_cache=False)
    return io.inputs, io.outputs


def layer_mse(student: ZooForCausalLM, inputs: Mapping[int, torch.Tensor],
              outputs: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Per replaced layer: MSE between the student mixer's output on the teacher's normed
    inputs and the teacher attention's output there."""
    losses = {}
    for i, x in inputs.items():
        y, _ = student.model.layers[i].mixer(x.to(student.dtype), None)
        losses[i] = F.mse_loss(y.float(), outputs[i].float())
    return losses


def layer_attention_ce(student: ZooForCausalLM, teacher: ZooForCausalLM,
                       inputs: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Per replaced layer: cross-entropy of the student mixer's attention rows against the
    teacher attention's softmax rows on the same inputs (LoLCATs' xent), mean over (B, H, T)
    of -sum_j p_tj log q_tj."""
    losses = {}
    for i, x in inputs.items():
        with torch.no_grad():
            p = teacher.model.layers[i].mixer.attention_weights(x)
        q = student.model.layers[i].mixer.attention_weights(x.to(student.dtype))
        # q > 0 wherever p > 0 (the window's exp and the features are positive); the clamp
        # keeps 0 * log 0 at 0 above the diagonal
        losses[i] = -(p * q.clamp_min(1e-30).log()).sum(-1).mean()
    return losses


def check_attention_weights(teacher: ZooForCausalLM, student: ZooForCausalLM,
                            layers: Sequence[int]) -> None:
    """The attention-weight cross-entropy needs both mixers' weights at every layer."""
    for i in layers:
        for who, model in (("teacher", teacher), ("student", student)):
            mixer = model.model.layers[i].mixer
            if not hasattr(mixer, "attention_weights"):
                raise ValueError(
                    f"attention_ce: the {who}'s layer {i} mixer ({type(mixer).__name__}) has no "
                    "attention weights to compare; window_linear_attention students of "
                    "softmax attention teachers have them (or set attention_ce=0)")


@dataclasses.dataclass
class TransferResult:
    steps: int
    trained_parameters: list[str]
    history: list[dict[str, Any]]  # per step: {"step", "loss" (mean MSE), "layers": {i: mse},
    # "attention_ce" (mean over layers, when on)}
    before: dict[int, float]  # per-layer MSE on the evaluation batch before training
    after: dict[int, float]  # ... and after


def freeze_copied(student: ZooForCausalLM, report: LinearizeReport,
                  layers: Sequence[int] | None = None) -> list[str]:
    """requires_grad only on the new parameters of the replaced layers' mixers; returns their
    names (an empty list when the replacement has no new parameters, e.g. elu+1)."""
    layers = report.replaced if layers is None else layers
    prefixes = tuple(f"model.layers.{i}.mixer." for i in layers)
    new = set(report.new_parameters(student))
    trained = []
    for name, p in student.named_parameters():
        p.requires_grad_(name in new and name.startswith(prefixes))
        if p.requires_grad:
            trained.append(name)
    return trained


def attention_transfer(
    teacher: ZooForCausalLM,
    student: ZooForCausalLM,
    batches: Callable[[int], torch.Tensor],
    *,
    steps: int,
    lr: float = 1e-2,
    eval_ids: torch.Tensor | None = None,
    progress: bool = True,
    log: Callable[[dict[str, Any]], None] | None = None,
    attention_ce: float = 0.0,
) -> TransferResult:
    """Stage 1: train the replaced layers' new parameters to match the teacher's attention
    outputs (per-layer MSE on the teacher's own inputs), plus `attention_ce` x the
    cross-entropy of their attention weights against the teacher's (LoLCATs' xent; 0: off);
    copied parameters stay frozen.

    batches(step) -> ids (B, T); eval_ids: a fixed batch for the before/after MSE (default the
    first training batch). All of the student's parameters are trainable again on return.
    """
    report: LinearizeReport | None = getattr(student, "linearization", None)
    if report is None:
        raise ValueError("attention_transfer: the student was not built by linearize()")
    layers = report.replaced
    if attention_ce < 0:
        raise ValueError(f"attention_ce={attention_ce} must be >= 0")
    if attention_ce > 0:
        check_attention_weights(teacher, student, layers)
    device = next(student.parameters()).device
    teacher.eval()
    eval_ids = batches(0) if eval_ids is None else eval_ids
    eval_io = teacher_mixer_io(teacher, eval_ids.to(device), layers) if layers else ({}, {})

    def evaluate() -> dict[int, float]:
        with torch.no_grad():
            return {i: float(v) for i, v in layer_mse(student, *eval_io).items()}

    before = evaluate()
    trained = freeze_copied(student, report)
    history: list[dict[str, Any]] = []
    try:
        if not trained or steps == 0:
            return TransferResult(0, trained, history, before, before)
        optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
        student.train()
        bar = tqdm(range(steps), desc="attention transfer", unit="step", disable=not progress,
                   dynamic_ncols=True)
        start, tokens = time.perf_counter(), 0
        for step in bar:
            ids = batches(step).to(device)
            tokens += ids.numel()
            inputs, outputs = teacher_mixer_io(teacher, ids, layers)
            losses = layer_mse(student, inputs, outputs)
            loss = torch.stack(list(losses.values())).mean()
            record = {"step": step + 1, "loss": float(loss.detach()),
                      "layers": {i: float(v.detach()) for i, v in losses.items()}}
            if attention_ce > 0:
                ce = torch.stack(list(layer_attention_ce(student, teacher, inputs).values()))
                record["attention_ce"] = float(ce.detach().mean())
                loss = loss + attention_ce * ce.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.append(record)
            if log is not None:
                log(record)
            bar.set_postfix(mse=f"{record['loss']:.4g}",
                            tok_s=f"{tokens / (time.perf_counter() - start):,.0f}")
        student.eval()
        return TransferResult(steps, trained, history, before, evaluate())
    finally:
        for p in student.parameters():
            p.requires_grad_(True)
