"""`Trainer(run_config).fit()`: the training loop, assembled from the components beside it.

    from zoo.train import Trainer, load_run_config
    summary = Trainer(load_run_config("demo", ["train.steps=100"])).fit()

One optimizer step = `optim.grad_accum` micro-batches over every rank, `train.batch_size`
sequences in all. The loss is summed over the scored tokens of the whole step and divided by
their global count, so one process and N processes (DDP or FSDP) compute the same gradient, and
a run resumed from a checkpoint continues the very same sequence of batches: the sequence at
global sample position p is a pure function of (seed, p).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from zoo.compression import CompressionError
from zoo.compression.qat import fake_quantize_model
from zoo.config import ConfigError, load_config
from zoo.model import ZooForCausalLM
from zoo.train import distributed
from zoo.train.checkpoint import (
    check_model_config,
    check_model_tensors,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    save_final,
)
from zoo.train.config import RunConfig, RunConfigError
from zoo.train.data import build_dataset
from zoo.train.loop import (
    LoopPlan,
    StopSignals,
    build_optimizer,
    build_scheduler,
    optimizer_step,
    run_steps,
    seed_everything,
)
from zoo.train.metrics import PLOT_FILE, MetricsLog, format_eval_table, plot_losses
from zoo.train.run_folder import RunFolder

IGNORE = -100


def _stats_to_json(stats: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, value in stats.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().float().cpu()
            out[name] = value.item() if value.numel() == 1 else value.tolist()
        else:
            out[name] = value
    return out


class Trainer:
    """Builds the model, data, optimizer and schedule from a RunConfig; `fit()` trains.

    resume: True continues from the newest intact checkpoint in `<out_dir>/checkpoints` (from
    step 0 when the run stopped before its first); a path continues from that checkpoint
    folder. overwrite: start again in an out_dir that already holds a run (its metrics,
    checkpoints and final weights are deleted first). Both refuse a folder zoo did not make
    (zoo.train.run_folder), and a resume whose config the checkpoint cannot continue.
    """

    def __init__(
        self, run: RunConfig, *, resume: bool | str | Path = False, overwrite: bool = False,
        progress: bool = True,
    ):
        try:
            self._setup(run, resume, overwrite, progress)
        except BaseException:
            self.close()  # release the out_dir lock and the process group
            raise

    def _setup(self, run: RunConfig, resume: bool | str | Path, overwrite: bool,
               progress: bool) -> None:
        self.dist = distributed.setup(run.train.device)
        self.run = run.check(self.dist.world_size)
        self.progress = progress and self.dist.is_main
        if run.train.threads:
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(run.train.threads)
        self.device = self.dist.device
        self.out_dir = Path(run.out_dir)
        self.folder = RunFolder(self.out_dir, outputs=(PLOT_FILE,), command="zoo train")
        try:
            self.model_config = load_config(run.model.config, **dict(run.model.overrides))
        except ConfigError as error:
            raise RunConfigError(f"model (config {run.model.config!r}): {error}") from None
        resume_from = self._prepare_out_dir(resume, overwrite)
        self.metrics = MetricsLog(self.out_dir, enabled=self.dist.is_main)

        # The same seed on every rank: every replica starts from the same weights.
        seed_everything(run.train.seed)
        self.model = ZooForCausalLM(self.model_config).to(self.device)
        if run.quant_format is not None:
            # before DDP / FSDP / compile wrap it: they see the fake-quantised forward
            try:
                fake_quantize_model(self.model, *run.quant_format)
            except CompressionError as error:
                raise RunConfigError(
                    f"quant={run.quant!r}, quant_group_size={run.quant_group_size}: "
                    f"{error.detail}") from None
        self.n_params = sum(p.numel() for p in self.model.parameters())

        # Rank 0 tokenises the corpus (once, cached) while the others wait for it.
        if not self.dist.is_main:
            distributed.barrier(self.dist)
        self.dataset, self.tokenizer = build_dataset(
            run.data, run.train.seq_len, run.train.seed, self.model_config.vocab_size,
            progress=self.progress,
        )
        if self.dist.is_main:
            distributed.barrier(self.dist)

        self.step = 0
        self.samples_seen = 0
        checkpoint = None
        if resume_from is not None:
            checkpoint = load_checkpoint(resume_from, self.model_config)
            check_model_tensors(resume_from, checkpoint.model, self.model.state_dict())
            self.model.load_state_dict(checkpoint.model)
        self.train_model = distributed.parallelize(
            self.model, run.strategy, self.dist, run.train.compile
        )
        if isinstance(self.train_model, nn.parallel.DistributedDataParallel) and any(
            hasattr(b.ffn, "last_stats") for b in self.model.model.layers
        ):
            # MoE: an expert no token was routed to in a step has no gradient.
            self.train_model.find_unused_parameters = True
        self.optimizer = build_optimizer(self.train_model.parameters(), run.optim)
        self.scheduler = build_scheduler(self.optimizer, run.optim, run.train.steps)
        if checkpoint is not None:
            self._restore(checkpoint)
        self.resumed_from = checkpoint.path if checkpoint is not None else None

    # -----------------------------------------------------------------------------------------
    # set-up

    def _prepare_out_dir(self, resume: bool | str | Path, overwrite: bool) -> Path | None:
        """Check the folder, the checkpoint and the config against it before any work, then
        claim the folder; the checkpoint to resume from, or None."""
        plan = self.folder.plan(resume, overwrite, self.run.to_dict())
        if plan.state is not None:
            check_model_config(plan.checkpoint, plan.state, self.model_config)
        self.start_notes = plan.notes
        distributed.barrier(self.dist)  # every rank has read the folder before rank 0 claims it
        if self.dist.is_main:
            for note in plan.notes:
                tqdm.write(note, file=sys.stderr)
            self.folder.claim(self.run.to_dict(), fresh=plan.clear)
        distributed.barrier(self.dist)
        return plan.checkpoint

    def _restore(self, checkpoint) -> None:
        distributed.load_full_state_dicts(
            self.train_model, self.optimizer, checkpoint.model, checkpoint.optimizer
        )
        self.scheduler.load_state_dict(dict(checkpoint.scheduler, lr_lambdas=[None]))
        restore_rng(checkpoint.rng)
        self.step = checkpoint.step
        self.samples_seen = int(checkpoint.train_state["samples_seen"])
        self.metrics.truncate_after(self.step)

    # -----------------------------------------------------------------------------------------
    # one step

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(
            device_type=self.device.type, dtype=torch.bfloat16,
            enabled=self.run.train.precision == "bfloat16",
        )

    def _rank_slice(self, start: int, global_count: int) -> np.ndarray:
        per_rank = global_count // self.dist.world_size
        first = start + self.dist.rank * per_rank
        return np.arange(first, first + per_rank)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over `batch_size` sequences; returns the step's metrics."""
        run, info = self.run, self.dist
        accum, micro = run.optim.grad_accum, run.micro_batch_size
        batches = []
        for m in range(accum):
            ids, labels = self.dataset.train_batch(
                self._rank_slice(self.samples_seen + m * micro, micro))
            batches.append((ids.to(self.device), labels.to(self.device)))
        count = torch.tensor(
            float(sum(int((labels[:, 1:] != IGNORE).sum()) for _, labels in batches)),
            device=self.device,
        )
        count = distributed.all_reduce_sum(count, info).clamp_min(1.0)
        self.train_model.train()
        ce_total = torch.zeros((), device=self.device)
        aux_total = torch.zeros((), device=self.device)
        has_aux = False
        is_ddp = isinstance(self.train_model, nn.parallel.DistributedDataParallel)
        for m, (ids, labels) in enumerate(batches):
            last = m == accum - 1  # DDP all-reduces the gradients on the last micro-batch only
            skip_sync = is_ddp and not last
            context = self.train_model.no_sync() if skip_sync else contextlib.nullcontext()
            with context:
                with self.autocast():
                    out = self.train_model(input_ids=ids, use_cache=False)
                ce = F.cross_entropy(
                    out.logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                    ignore_index=IGNORE, reduction="sum",
                )
                # DDP and FSDP average gradients over ranks; x world_size makes that a sum.
                loss = ce * (info.world_size / count)
                if out.aux_loss is not None:
                    has_aux = True
                    loss = loss + out.aux_loss.float() / accum
                    aux_total += out.aux_loss.detach().float()
                loss.backward()
            ce_total += ce.detach()
        totals = distributed.all_reduce_sum(torch.stack([ce_total, aux_total]), info)
        lr, grad_norm = optimizer_step(self.optimizer, self.scheduler,
                                       self.train_model.parameters(), run.optim.grad_clip)
        self.step += 1
        self.samples_seen += run.train.batch_size
        record: dict[str, Any] = {"loss": float(totals[0] / count), "lr": lr,
                                  "grad_norm": grad_norm}
        if has_aux:
            record["aux_loss"] = float(totals[1]) / (accum * info.world_size)
            moe = {f"layer{i}": _stats_to_json(block.ffn.last_stats)
                   for i, block in enumerate(self.model.model.layers)
                   if getattr(block.ffn, "last_stats", None)}
            if moe:
                record["moe"] = moe  # this rank's last micro-batch
        return record

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss, perplexity (and answer accuracy for synthetic tasks) on the held-out split:
        `eval_batches` x `batch_size` sequences (fewer if the split is smaller), the same ones
        every time.
        """
        run, info = self.run, self.dist
        total = min(run.train.eval_batches * run.train.batch_size, self.dataset.num_val)
        total = max(info.world_size, total - total % info.world_size)
        indices = self._rank_slice(0, total)
        chunk = max(1, run.micro_batch_size // info.world_size)
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.train_model.eval()
        for i in range(0, len(indices), chunk):
            ids, labels = self.dataset.val_batch(indices[i: i + chunk])
            ids, labels = ids.to(self.device), labels.to(self.device)
            with self.autocast():
                logits = self.train_model(input_ids=ids, use_cache=False).logits
            logits, targets = logits[:, :-1].float(), labels[:, 1:]
            scored = targets != IGNORE
            sums[0] += F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                       ignore_index=IGNORE, reduction="sum").double()
            sums[1] += scored.sum()
            sums[2] += ((logits.argmax(-1) == targets) & scored).sum()
        self.train_model.train()
        sums = distributed.all_reduce_sum(sums, info)
        loss = float(sums[0] / sums[1].clamp_min(1))
        result = {"val_loss": loss, "val_ppl": math.exp(min(loss, 80.0))}
        if self.dataset.has_accuracy:
            result["val_accuracy"] = float(sums[2] / sums[1].clamp_min(1))
        return result

    # -----------------------------------------------------------------------------------------
    # checkpoints

    def save(self) -> Path | None:
        """A checkpoint of this step (collective; rank 0 writes). Returns its folder on rank 0."""
        model_state, optim_state = distributed.full_state_dicts(self.train_model, self.optimizer)
        path = None
        if self.dist.is_main:
            path = save_checkpoint(
                self.out_dir, self.step, model=model_state, optimizer=optim_state,
                scheduler=self.scheduler.state_dict(),
                train_state={"samples_seen": self.samples_seen,
                             "tokens_seen": self.samples_seen * self.run.train.seq_len},
                model_config=self.model_config, run_config=self.run.to_dict(),
                keep_last=self.run.checkpoint.keep_last,
            )
            self.metrics.write({"kind": "checkpoint", "step": self.step, "path": str(path)})
        distributed.barrier(self.dist)
        return path

    def save_final(self) -> Path | None:
        """`<out>/final`: a save_pretrained folder (collective; rank 0 writes)."""
        state = distributed.full_model_state_dict(self.train_model)
        path = None
        if self.dist.is_main:
            path = save_final(ZooForCausalLM, self.model_config, state, self.out_dir / "final")
        distributed.barrier(self.dist)
        return path

    # -----------------------------------------------------------------------------------------
    # the loop

    def _describe(self) -> str:
        run = self.run
        data = run.data.source
        if data == "text":
            cache = self.dataset.cache
            where = "the Python standard library" if not run.data.paths else ", ".join(
                run.data.paths)
            data = (f"{cache.meta['train_tokens']:,} training tokens "
                    f"({cache.meta['train_documents']} files of {where}, "
                    f"tokenizer {run.data.tokenizer})")
        tokens = run.train.steps * run.train.batch_size * run.train.seq_len
        return (f"{run.name}: {self.model_label()}, {self.n_params:,} parameters, on {data}; "
                f"{run.train.steps} steps x {run.train.batch_size} x {run.train.seq_len} tokens "
                f"= {tokens:,} tokens, strategy {run.strategy} on {self.dist.world_size} x "
                f"{self.device.type}, {run.train.precision}{self._describe_quant()}")

    def _describe_quant(self) -> str:
        if self.run.quant_format is None:
            return ""
        weights, group_size = self.run.quant_format
        grouping = "per output channel" if group_size is None else f"groups of {group_size}"
        return f", quantisation-aware: fake {weights} weights ({grouping})"

    def fit(self) -> dict[str, Any]:
        """Train to `train.steps`; returns a summary (final losses, paths, `interrupted`)."""
        run, info = self.run, self.dist
        t = run.train
        start_time = time.perf_counter()
        if self.progress:
            tqdm.write(self._describe())
        if info.is_main:
            event = {"kind": "resume", "step": self.step, "path": str(self.resumed_from)} if (
                self.resumed_from) else {"kind": "start", "step": 0}
            notes = {"notes": self.start_notes} if self.start_notes else {}
            self.metrics.write({**event, "world_size": info.world_size,
                                "parameters": self.n_params, **notes})
        if self.step == 0 and t.eval_interval:
            self.log_eval()
        plan = LoopPlan.of(run.name, t, run.checkpoint)
        with StopSignals(announce=info.is_main).handled() as stop:
            interrupted, _ = run_steps(
                self, plan, self.metrics, stop, progress=self.progress, start_time=start_time,
                agree=lambda signum: distributed.all_reduce_max(signum, info))
            if interrupted:
                path = self.save()
                if info.is_main:
                    self.metrics.write({"kind": "stop", "step": self.step, "signal": interrupted})
                    tqdm.write(f"{interrupted}: stopped at step {self.step}; checkpoint {path}; "
                               "continue with --resume")
                return {"interrupted": interrupted, "step": self.step, "checkpoint": path,
                        "out_dir": self.out_dir}
            last_eval = self.log_eval()
            checkpoint = self.save()
            final = self.save_final()
        summary: dict[str, Any] = {
            "interrupted": None, "step": self.step, "out_dir": self.out_dir,
            "checkpoint": checkpoint, "final": final,
            "seconds": time.perf_counter() - start_time, **last_eval,
        }
        if info.is_main:
            summary["plot"] = plot_losses(self.out_dir, title=self._plot_title())
            self.metrics.write({"kind": "end", "step": self.step, "seconds": summary["seconds"]})
            if self.progress:
                tqdm.write(f"trained {self.step} steps in {summary['seconds']:.0f} s; held-out "
                           f"split:\n{format_eval_table(self.out_dir)}\nloss curves: "
                           f"{summary['plot']}")
                if self.run.quant_format is not None:
                    weights, group_size = self.run.quant_format
                    sizes = "" if group_size is None else f" --group-size {group_size}"
                    tqdm.write(f"trained quantisation-aware: its {weights} model is `zoo "
                               f"compress {final} OUT --weights {weights}{sizes}`")
        return summary

    def log_eval(self) -> dict[str, float]:
        """evaluate(), written to the metrics."""
        result = self.evaluate()
        if self.dist.is_main:
            self.metrics.write({"kind": "eval", "step": self.step, **result,
                                "tokens": self.samples_seen * self.run.train.seq_len})
        return result

    def model_label(self) -> str:
        """'attention-tiny (d_model 128, 4 layers: attention + swiglu)'."""
        c = self.model_config
        kinds = ", ".join(dict.fromkeys(c.describe_layers()))
        return f"{self.run.model.config} (d_model {c.d_model}, {c.n_layers} layers: {kinds})"

    def _plot_title(self) -> str:
        source = "the Python stdlib" if self.run.data.source == "text" and not (
            self.run.data.paths) else self.run.data.source
        return f"{self.run.name}: {self.model_label()} on {source}"

    def close(self) -> None:
        """Leave the process group and release the out_dir lock."""
        if hasattr(self, "dist"):
            distributed.teardown(self.dist)
        if getattr(self, "_threads_before", None):
            torch.set_num_threads(self._threads_before)
            self._threads_before = None
        if hasattr(self, "folder"):
            self.folder.release()
