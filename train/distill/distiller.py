"""The Distiller: teacher, student, data and optimizer built from a DistillRunConfig; stage 1
(attention transfer, for linearised students) then stage 2 (KD) in the shared training loop."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from zoo.config import ConfigError, load_config
from zoo.model import ZooForCausalLM
from zoo.train import losses as L
from zoo.train.checkpoint import (
    CheckpointError,
    check_model_tensors,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    save_final,
)
from zoo.train.config import RunConfigError
from zoo.train.data import PackedTextDataset, build_dataset, default_cache_dir
from zoo.train.distill.config import LOSS_FIELDS, DistillRunConfig
from zoo.train.distill.logits_cache import TeacherLogitsCache
from zoo.train.distill.plot import PLOT_FILE, plot_distill
from zoo.train.distill.teacher import (
    Teacher,
    check_vocabularies,
    load_teacher,
    resolve_tokenizer,
    teacher_generate,
)
from zoo.train.distributed import world_size_from_env
from zoo.train.linearize import attention_transfer, linearize
from zoo.train.loop import (
    LoopPlan,
    StopSignals,
    build_optimizer,
    build_scheduler,
    optimizer_step,
    run_steps,
    seed_everything,
)
from zoo.train.lora import LoraSpec, adapted_base_parameter_names, add_lora, check_lora, merge_lora
from zoo.train.metrics import MetricsLog
from zoo.train.run_folder import RunFolder
from zoo.train.trainer import IGNORE

SUMMARY_FILE = "summary.json"
PROJECTION_PREFIX = "distill_projection."  # hidden-state projections, beside the student's weights


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


class Distiller:
    """Builds teacher, student, data and optimizer from a DistillRunConfig; `fit()` runs stage 1
    (attention transfer, linearised students with transfer.steps > 0) and stage 2 (KD).

    Stage 2 runs in the training loop `zoo train` uses (zoo.train.loop): the same schedule,
    logging, checkpoints and stop signals, with the distillation loss over the student's
    trainable parameters. The out_dir is prepared and locked as `zoo train` does
    (zoo.train.run_folder); `fit()` releases it at the end, `close()` otherwise.

    resume: True continues from the newest intact checkpoint (from the start when the run
    stopped before its first), a path from that checkpoint folder; the run config must agree
    with the checkpoint's (zoo.train.run_folder.RESUME_MAY_CHANGE lists what may change).
    teacher: an already-loaded Teacher (or model) to use instead of run.teacher.source (the
    demo and tests pass one to avoid loading it twice).
    """

    def __init__(self, run: DistillRunConfig, *, resume: bool | str | Path = False,
                 overwrite: bool = False, progress: bool = True,
                 teacher: Teacher | nn.Module | None = None):
        try:
            self._setup(run, resume, overwrite, progress, teacher)
        except BaseException:
            self.close()  # release the out_dir lock
            raise

    def _setup(self, run: DistillRunConfig, resume: bool | str | Path, overwrite: bool,
               progress: bool, teacher: Teacher | nn.Module | None) -> None:
        if world_size_from_env() > 1:
            raise RunConfigError("zoo distill runs in one process (teacher and student on one "
                                 "device); launch it without torchrun")
        self.run = run.check()
        self.progress = progress
        if run.train.threads:
            torch.set_num_threads(run.train.threads)
        device = run.train.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.out_dir = Path(run.out_dir)
        self.folder = RunFolder(self.out_dir, outputs=(PLOT_FILE, SUMMARY_FILE),
                                command="zoo distill")
        # before the teacher loads: a folder or a resume that cannot work fails at once
        plan = self.folder.plan(resume, overwrite, run.to_dict())
        resume_from = plan.checkpoint
        self.start_notes = plan.notes
        for note in plan.notes:
            tqdm.write(note, file=sys.stderr)
        self.folder.claim(run.to_dict(), fresh=plan.clear)
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
                                "layers": {str(k): v for k, v in record["layers"].items()},
                                **({"attention_ce": record["attention_ce"]}
                                   if "attention_ce" in record else {})})

        result = attention_transfer(
            self.teacher.model, self.student, batch, steps=t.steps, lr=t.lr,
            eval_ids=eval_ids, progress=self.progress, log=log, attention_ce=t.attention_ce)
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
        lr, grad_norm = optimizer_step(self.optimizer, self.scheduler, self.params,
                                       run.optim.grad_clip)
        self.step += 1
        self.samples_seen += run.train.batch_size
        return {"loss": loss_sum, **totals, "lr": lr, "grad_norm": grad_norm}

    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        model = self.student if model is None else model
        with self.autocast():
            result = perplexity(model, self.val_batches())
        self.student.train()
        return result

    def log_eval(self) -> dict[str, float]:
        """The student's evaluate(), written to the metrics."""
        result = self.evaluate()
        self.metrics.write({"kind": "eval", "step": self.step, **result,
                            "tokens": self.samples_seen * self.run.train.seq_len})
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
        also written to `<out_dir>/summary.json`. SIGTERM or Ctrl-C stops after the current KD
        step (or after stage 1) with a checkpoint: the summary then names the signal in
        `interrupted`, and `--resume` continues."""
        try:
            with StopSignals().handled() as self.stop:
                return self._fit()
        finally:
            self.close()

    def close(self) -> None:
        """Release the out_dir lock."""
        if hasattr(self, "folder"):
            self.folder.release()

    def _fit(self) -> dict[str, Any]:
        run, t = self.run, self.run.train
        start = time.perf_counter()
        tqdm.write(self.describe())
        if self.report is not None:
            tqdm.write(self.report.summary())
        notes = {"notes": self.start_notes} if self.start_notes else {}
        self.metrics.write({"kind": "start" if self._checkpoint is None else "resume",
                            "step": self.step, "parameters": self.n_params, **notes})
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
        self.optimizer = build_optimizer(self.params, run.optim)
        self.scheduler = build_scheduler(self.optimizer, run.optim, t.steps)
        if self._checkpoint is not None:
            ck = self._checkpoint
            self._load_optimizer_state(ck.optimizer)
            self.scheduler.load_state_dict(dict(ck.scheduler, lr_lambdas=[None]))
            self.step = ck.step
            self.samples_seen = int(ck.train_state["samples_seen"])
            self.metrics.truncate_after(self.step, other_axes=("transfer",))  # stage 1's steps
            restore_rng(ck.rng)  # LoRA dropout and seq-KD sampling continue as they would have
        plan = LoopPlan.of(f"{run.name} (KD)", t, run.checkpoint)
        kd_start = time.perf_counter()
        interrupted, _ = run_steps(self, plan, self.metrics, self.stop, progress=self.progress,
                                   start_time=start)
        kd_seconds = time.perf_counter() - kd_start
        if interrupted:
            path = self.save()
            self.metrics.write({"kind": "stop", "step": self.step, "signal": interrupted})
            tqdm.write(f"{interrupted}: stopped at KD step {self.step}; checkpoint {path}; "
                       "continue with --resume")
            return {"interrupted": interrupted, "step": self.step, "checkpoint": path,
                    "out_dir": self.out_dir}
        last_eval = self.log_eval()
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
            "interrupted": None, "step": self.step, "name": run.name,
            "teacher": self.teacher.source,
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
