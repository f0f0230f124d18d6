"""The parts of a training run that `zoo train` and `zoo distill` share: the optimizer and its
schedule, one optimizer step after the gradients are in, stop signals, and the step loop that
logs, evaluates and checkpoints.

A job hands the loop its own step (a loss over its own trainable parameters, backward, then
`optimizer_step`); the loop decides when to log, evaluate, checkpoint and stop, so a training
run and a distillation resume, stop on SIGTERM and write metrics the same way.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from zoo.train.config import CheckpointSection, OptimSection, TrainSection
from zoo.train.metrics import MetricsLog


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """The learning-rate factor at `step` (0-based): linear warm-up, then cosine to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(params: Iterable[nn.Parameter], optim: OptimSection) -> torch.optim.AdamW:
    """AdamW over the parameters that require grad, weight decay on matrices only: norms' gains
    and biases are not decayed."""
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": optim.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimSection,
                    steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over optim.warmup_steps, then cosine to optim.min_lr_ratio at `steps`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup=optim.warmup_steps, total=steps,
                                              min_ratio=optim.min_lr_ratio))


def optimizer_step(optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler,
                   params: Iterable[nn.Parameter], grad_clip: float) -> tuple[float, float]:
    """Clip (grad_clip <= 0: measure only), step, advance the schedule, clear the gradients;
    returns (the learning rate the step used, the gradient norm before clipping)."""
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
        grad_norm = grad_norm.full_tensor()
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr, float(grad_norm)


class StopSignals:
    """While entered, SIGTERM and Ctrl-C ask for a checkpoint at the end of the current step
    (`received` holds the signal number); a second Ctrl-C interrupts at once. Outside the main
    thread (signals cannot be caught there) it does nothing."""

    def __init__(self, announce: bool = True):
        self.announce = announce
        self.received = 0

    @contextlib.contextmanager
    def handled(self) -> Iterator[StopSignals]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame):
            if self.received and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.received = signum
            if self.announce:
                tqdm.write(f"{signal.Signals(signum).name}: saving a checkpoint after this step "
                           "(Ctrl-C again to abort without saving)")

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


class StepJob(Protocol):
    """What the loop drives: a training run or a distillation."""

    step: int  # optimizer steps taken
    samples_seen: int  # sequences trained on

    def train_step(self) -> dict[str, Any]:
        """One optimizer step; its metrics (at least "loss" and "lr")."""

    def log_eval(self) -> dict[str, float]:
        """Evaluate on the held-out split and write the result to the metrics."""

    def save(self) -> Path | None:
        """A checkpoint of this step."""


@dataclass
class LoopPlan:
    """When the loop logs, evaluates and checkpoints (every N steps; 0 = never)."""

    name: str  # the progress bar's label
    steps: int  # train until job.step reaches it
    batch_size: int  # sequences per step
    seq_len: int
    log_interval: int
    eval_interval: int
    checkpoint_interval: int

    @classmethod
    def of(cls, name: str, train: TrainSection, checkpoint: CheckpointSection) -> LoopPlan:
        """The plan a run config's train and checkpoint sections give."""
        return cls(name=name, steps=train.steps, batch_size=train.batch_size,
                   seq_len=train.seq_len, log_interval=train.log_interval,
                   eval_interval=train.eval_interval, checkpoint_interval=checkpoint.interval)


def run_steps(job: StepJob, plan: LoopPlan, metrics: MetricsLog, stop: StopSignals, *,
              progress: bool = True, start_time: float | None = None,
              agree: Callable[[int], int] = lambda signum: signum) -> tuple[str | None,
                                                                            dict[str, float]]:
    """Step `job` to plan.steps: log every log_interval steps (loss averaged over them, with
    tokens/s), evaluate every eval_interval and checkpoint every checkpoint_interval steps before
    the last. A stop signal (agreed on by every rank through `agree`) ends the loop after the
    current step; so does one received before the first. Returns (the signal's name or None,
    the last evaluation made here, {} if none)."""
    start_time = time.perf_counter() if start_time is None else start_time
    bar = tqdm(total=plan.steps, initial=job.step, desc=plan.name, unit="step",
               disable=not progress, dynamic_ncols=True)
    tokens_per_step = plan.batch_size * plan.seq_len
    window_start, window_steps, window_loss = time.perf_counter(), 0, 0.0
    last_eval: dict[str, float] = {}
    interrupted = None
    try:
        signum = agree(stop.received)
        if signum and job.step < plan.steps:
            return signal.Signals(signum).name, last_eval
        while job.step < plan.steps:
            record = job.train_step()
            window_steps += 1
            window_loss += record["loss"]
            now = time.perf_counter()
            tokens_per_s = window_steps * tokens_per_step / max(now - window_start, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                            tok_s=f"{tokens_per_s:,.0f}")
            if job.step % plan.log_interval == 0 or job.step == plan.steps:
                metrics.write({
                    "kind": "train", "step": job.step, **record,
                    "loss": window_loss / window_steps,
                    "tokens": job.samples_seen * plan.seq_len,
                    "tokens_per_s": tokens_per_s, "elapsed_s": now - start_time,
                })
                window_start, window_steps, window_loss = now, 0, 0.0
            before_end = job.step < plan.steps
            if plan.eval_interval and job.step % plan.eval_interval == 0 and before_end:
                last_eval = job.log_eval()
            if plan.checkpoint_interval and job.step % plan.checkpoint_interval == 0 and (
                    before_end):
                job.save()
            signum = agree(stop.received)
            if signum and job.step < plan.steps:
                interrupted = signal.Signals(signum).name
                break
    finally:
        bar.close()
    return interrupted, last_eval
