"""`make demo`: the zoo's story in about six minutes on a 2-core CPU.

1. Train a small softmax-attention teacher on the Python standard library (byte level).
2. Linearise it as LoLCATs does: every attention layer becomes softmax attention over the last
   64 tokens plus Hedgehog linear attention over every token before them (q/k/v/o and the
   rotary positions copied), attention transfer trains the feature maps to mimic each layer's
   attention, then end-to-end knowledge distillation (forward KL to the teacher's logits + a
   little data CE).
3. Print both validation perplexities, a greedy sample from each, and decode ms/token of each at
   a short and a long context (the teacher's KV cache grows; the student's state does not), and
   write the same as `runs/demo/REPORT.md` with PNG plots beside it.

    python -m zoo.app.demo [--out runs/demo] [--quick]

Budgets are step counts, not wall time, so the run is the same on every machine; `--quick` is a
smoke-sized version (about a minute).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from zoo.app.cli import human_bytes

PROMPT = "    def __init__(self, "
LONG_CONTEXT = 4096
SHORT_CONTEXT = 128

def teacher_overrides(out: Path, quick: bool) -> list[str]:
    """The shipped `demo` training run (attention, d_model 128, 4 layers, 3 MB of stdlib
    bytes), in the demo's folder. 1000 steps: about 3 minutes of the demo's ~6 on 2 cores."""
    steps = 30 if quick else 1000
    return [f"out_dir={out / 'teacher'}", f"train.steps={steps}", "train.eval_interval=250",
            "checkpoint.interval=0", "checkpoint.keep_last=1"]


def student_run(out: Path, quick: bool) -> dict:
    return {
        "name": "demo-student", "out_dir": str(out / "student"),
        "teacher": {"source": str(out / "teacher")},
        # LoLCATs' student: softmax over the last 64 tokens, Hedgehog linear attention before
        "student": {"linearize": {"mixer": {"type": "window_linear_attention", "window": 64,
                                            "feature_map": "hedgehog"}}},
        "distill": {"forward_kl": 1.0, "ce": 0.2, "temperature": 1.0},
        "transfer": {"steps": 10 if quick else 150, "lr": 1e-2, "batch_size": 8},
        "data": {"source": "text", "tokenizer": "teacher", "max_bytes": 3_000_000},
        "optim": {"lr": 2e-3, "warmup_steps": 10},
        "train": {"steps": 20 if quick else 400, "batch_size": 16, "seq_len": 256,
                  "eval_interval": 100, "eval_batches": 4},
        "checkpoint": {"interval": 0, "keep_last": 1},
    }


def train_teacher(out: Path, quick: bool) -> dict:
    """Step 1 (zoo.train): the attention teacher; returns the trainer's summary."""
    from zoo.train import Trainer, load_run_config

    trainer = Trainer(load_run_config("demo", teacher_overrides(out, quick)), overwrite=True)
    try:
        return trainer.fit()
    finally:
        trainer.close()


def distill_student(out: Path, quick: bool):
    """Step 2 (zoo.train.distill): linearise the teacher, attention transfer, KD."""
    from zoo.train.distill import Distiller, distill_config_from_dict

    run = distill_config_from_dict(student_run(out, quick))
    distiller = Distiller(run, overwrite=True)
    return distiller, distiller.fit()


@torch.no_grad()
def sample(model, n_tokens: int) -> str:
    ids = torch.tensor([list(PROMPT.encode())])
    out = model.generate(ids, max_new_tokens=n_tokens, do_sample=False)
    return bytes(out[0].tolist()).decode("utf-8", errors="replace")


def plot_decode(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    contexts = sorted({r["context"] for r in rows})
    width = 0.38
    for j, name in enumerate(("teacher", "student")):
        mine = {r["context"]: r for r in rows if r["model"] == name}
        xs = [i + (j - 0.5) * width for i in range(len(contexts))]
        axes[0].bar(xs, [mine[c]["ms_per_token"] for c in contexts], width, label=name)
        axes[1].bar(xs, [mine[c]["state_bytes"] / 2**20 for c in contexts], width, label=name)
    for ax, label in zip(axes, ("decode ms / token", "state per sequence (MiB)")):
        ax.set_xticks(range(len(contexts)), [f"{c:,} ctx" for c in contexts])
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend()
    fig.suptitle("decoding after a context: attention teacher vs linear-attention student")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m zoo.app.demo",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/demo", help="the run directory")
    parser.add_argument("--quick", action="store_true", help="a one-minute smoke version")
    args = parser.parse_args(argv)
    out = Path(args.out)
    torch.manual_seed(0)
    start = time.perf_counter()
    from zoo.app.bench.harness import device_name
    from zoo.app.distill_report import measure_decode, write_report

    print("== 1. a softmax-attention teacher, trained on the Python standard library (bytes)")
    teacher_summary = train_teacher(out, args.quick)
    print(f"teacher: val ppl {teacher_summary['val_ppl']:.3f} after "
          f"{teacher_summary['step']} steps ({teacher_summary['seconds']:.0f} s)\n")

    print("== 2. linearise it (64-token window + Hedgehog linear attention in every layer), "
          "attention transfer, KD")
    distiller, summary = distill_student(out, args.quick)
    teacher, student = distiller.teacher.model, distiller.student

    print("\n== 3. the two models side by side")
    contexts = [SHORT_CONTEXT, 512 if args.quick else LONG_CONTEXT]
    decode = measure_decode({"teacher": teacher, "student": student}, contexts)
    n_sample = 60 if args.quick else 160
    samples = {"teacher (attention)": sample(teacher, n_sample),
               "student (window + linear attention)": sample(student, n_sample)}
    print(f"held-out perplexity: teacher {summary['teacher_val_ppl']:.3f}, student "
          f"{summary['student_val_ppl']:.3f} "
          f"({summary['student_val_ppl'] / summary['teacher_val_ppl']:.2f}x)")
    for row in decode:
        print(f"  {row['model']:8s} decode at {row['context']:5d} context: "
              f"{row['ms_per_token']:6.2f} ms/token, state {human_bytes(row['state_bytes'])}, "
              f"{row['achieved_GB_per_s']:.2f} GB/s")
    for name, text in samples.items():
        print(f"\n--- {name}:\n{text}")
    decode_png = plot_decode(decode, out / "decode.png")
    notes = [
        f"Teacher trained by `zoo train` ({teacher_summary['step']} steps x 16 x 256 bytes); "
        f"its loss curve: teacher/loss.png.",
        "Student = the teacher with every attention layer replaced by softmax attention over "
        "the last 64 tokens plus Hedgehog linear attention over the tokens before them (LoLCATs; "
        "feature maps on the rotary-embedded q and k); distillation curves: "
        "student/distill.png.",
        f"Decode timings: batch 1, the median of 8 steps; the {contexts[-1]:,}-token attention "
        "cache after a 256-token real prefill is filled with synthetic keys/values (decode cost "
        f"depends on the cache's length, not its values). Plot: {decode_png.name}.",
        f"Whole demo: {time.perf_counter() - start:.0f} s.",
    ]
    paths = write_report(summary, decode, out / "REPORT", device=device_name("cpu"),
                         title="zoo demo: an attention teacher distilled into a recurrent student",
                         notes=notes, samples=samples)
    print(f"\nreport: {paths['md']} (plots: {paths['png']}, {decode_png}, "
          f"{out / 'teacher' / 'loss.png'})")


if __name__ == "__main__":
    main()
