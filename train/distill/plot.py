"""`<run>/distill.png`: the curves of both stages of a distillation run."""

from __future__ import annotations

from pathlib import Path

from zoo.train.distill.config import LOSS_FIELDS
from zoo.train.metrics import read_metrics

PLOT_FILE = "distill.png"


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

