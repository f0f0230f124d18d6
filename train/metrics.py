"""metrics.jsonl (one JSON record per line) and the loss-curve PNG drawn from it.

Records carry a `kind`: "train" (step, loss, lr, grad_norm, tokens, tokens_per_s, aux_loss and
per-layer MoE statistics when present), "eval" (step, val_loss, val_ppl, val_accuracy for
synthetic tasks), and events ("start", "resume", "checkpoint", "stop", "end").
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class MetricsLog:
    """Appends records to `<out>/metrics.jsonl`, flushed line by line (a kill loses nothing
    already logged)."""

    def __init__(self, out_dir: Path, enabled: bool = True):
        self.path = out_dir / METRICS_FILE
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
            f.flush()

    def truncate_after(self, step: int, other_axes: Collection[str] = ()) -> None:
        """Drop the records of steps after `step`: a run resumed from a checkpoint at `step`
        logs them again, so the file reads as one uninterrupted run. Records of the kinds in
        `other_axes` count their steps on another axis (a distillation's stage 1) and stay.
        """
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path.parent)
                if r.get("step", 0) <= step or r.get("kind") in other_axes]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of a run folder's metrics.jsonl (a torn last line, from a kill, is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a zoo train output folder?")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r.get("kind") == "train"}


def eval_records(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(run_dir) if r.get("kind") == "eval"]


def format_eval_table(run_dir: Path) -> str:
    """The validation passes of a run as a small text table (step, tokens, loss, perplexity,
    and accuracy for synthetic tasks)."""
    rows = eval_records(run_dir)
    accuracy = any("val_accuracy" in r for r in rows)
    lines = [f"{'step':>6s} {'tokens':>11s} {'val loss':>9s} {'val ppl':>9s}"
             + (f" {'accuracy':>9s}" if accuracy else "")]
    for r in rows:
        lines.append(f"{r['step']:6d} {r.get('tokens', 0):11,d} {r['val_loss']:9.4f} "
                     f"{r['val_ppl']:9.3f}"
                     + (f" {r.get('val_accuracy', float('nan')):9.3f}" if accuracy else ""))
    return "\n".join(lines)


def plot_losses(run_dir: Path, title: str | None = None) -> Path:
    """`<run>/loss.png`: training loss per step (and its running mean) and validation loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = sorted((r["step"], r["loss"]) for r in records if r.get("kind") == "train")
    val = sorted((r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval")
    if not train and not val:
        raise ValueError(f"{run_dir / METRICS_FILE} holds no train or eval records to plot")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="train loss")
        window = max(1, len(losses) // 25)
        if window > 1:
            smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(
                losses[max(0, i - window + 1): i + 1]) for i in range(len(losses))]
            ax.plot(steps, smooth, color="tab:blue", linewidth=2,
                    label=f"train loss (mean of {window})")
    if val:
        steps, losses = zip(*val)
        ax.plot(steps, losses, color="tab:orange", marker="o", linewidth=2, label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    finite = [v for _, v in train + val if math.isfinite(v)]
    if finite and max(finite) / max(min(finite), 1e-9) > 20:
        ax.set_yscale("log")
    ax.set_title(title or run_dir.name)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = run_dir / PLOT_FILE
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
