"""`zoo bench linearize-ablation`: which parts of the LoLCATs recipe keep a linearised student
close to its teacher, at one fixed token budget.

The teacher is the demo's (softmax attention, d_model 128, 4 layers, trained on the Python
standard library as bytes); it is trained once into the bench's folder and reused. Every
variant is the same distillation (attention transfer, then KD: the same steps, batch and
length, so the same tokens) of that teacher into another student, and each row gives the
student's held-out perplexity beside the teacher's and its decode ms/token at 8k context.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from zoo.app.bench.harness import BenchOptions, register_bench
from zoo.app.decode_timer import time_decode

WINDOW_HEDGEHOG = {"type": "window_linear_attention", "window": 64, "feature_map": "hedgehog"}

# (name, what the row changes, the student's linearize spec, extra distill settings)
VARIANTS: list[tuple[str, str, dict, dict]] = [
    ("window 64, hedgehog, after rotary", "LoLCATs' layer", WINDOW_HEDGEHOG, {}),
    ("window 16", "a shorter window", {**WINDOW_HEDGEHOG, "window": 16}, {}),
    ("window 0 (linear attention)", "no window: Hedgehog linear attention with rotary",
     {"type": "linear_attention", "feature_map": "hedgehog"}, {}),
    ("elu+1 feature map", "a fixed feature map in place of Hedgehog's learned one",
     {**WINDOW_HEDGEHOG, "feature_map": "elu+1"}, {}),
    ("feature maps before rotary", "the feature maps see q and k without positions",
     {**WINDOW_HEDGEHOG, "feature_maps_after_rotary": False}, {}),
    ("LoRA in KD", "stage 2 trains rank-8 adapters on q/k/v/o instead of the mixers",
     WINDOW_HEDGEHOG, {"lora": {"rank": 8, "alpha": 16.0}}),
    ("Mamba-2 student", "Mamba-in-Llama: q -> C, k -> B, v -> x, o -> out_proj",
     {"type": "mamba2"}, {}),
]


def teacher_dir(out: Path, quick: bool) -> Path:
    """The demo's teacher, trained once into `out` (reused by later runs of this bench)."""
    from zoo.app.demo import teacher_overrides
    from zoo.train import Trainer, load_run_config

    folder = out / "teacher"
    if not (folder / "final" / "config.json").exists():
        trainer = Trainer(load_run_config("demo", teacher_overrides(out, quick)), overwrite=True)
        try:
            trainer.fit()
        finally:
            trainer.close()
    return folder


def student_run(out: Path, name: str, mixer: dict, distill: dict, quick: bool) -> dict:
    """One variant's distillation run: the demo's recipe with another student and a fixed
    token budget (the same steps, batch and length for every variant)."""
    from zoo.app.demo import student_run as demo_run

    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    run = demo_run(out, quick)
    run.update(name=f"ablation-{slug}", out_dir=str(out / "students" / slug),
               student={"linearize": {"mixer": mixer}})
    run["distill"] = {**run["distill"], **distill}
    run["transfer"]["steps"] = 10 if quick else 100
    run["train"]["steps"] = 10 if quick else 200
    return run


def ablation_report(rows: list[dict]) -> str:
    lines = ["| student | what changes | held-out ppl | x teacher | decode ms/token at 8k | "
             "state | tokens seen | student mixer as built |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['variant']} | {r['change']} | - | - | - | - | - | "
                         f"not run: {r['skipped']} |")
            continue
        lines.append(
            f"| {r['variant']} | {r['change']} | {r['student_ppl']:.3f} | "
            f"x{r['ppl_ratio']:.3f} | {r['decode_ms_8k']:.3f} | "
            f"{r['state_bytes_8k'] / 2**10:.0f} KiB | {r['tokens_seen']:,} | "
            f"{_spec_text(r.get('student_mixer'), r.get('copied_mixer_tensors'))} |")
    teacher = next((r for r in rows if not r.get("skipped")), None)
    if teacher is not None:
        lines += ["", f"Teacher (softmax attention): held-out perplexity "
                  f"{teacher['teacher_ppl']:.3f}, decode {teacher['teacher_decode_ms_8k']:.3f} "
                  f"ms/token at 8k with a {teacher['teacher_state_bytes_8k'] / 2**20:.1f} MiB KV "
                  "cache."]
    return "\n".join(lines)


def _spec_text(spec: dict | None, copied: int | None) -> str:
    if not spec:
        return "-"
    shown = ", ".join(f"{k}={v}" for k, v in spec.items() if k not in ("n_heads", "n_kv_heads"))
    return shown + ("" if copied is None else f"; {copied} mixer tensors copied")


def ablation_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if not r.get("skipped")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["variant"] for r in done]
    axes[0].barh(names, [r["ppl_ratio"] for r in done], color="tab:blue")
    axes[0].axvline(1.0, color="tab:green", linestyle="--", label="teacher")
    axes[0].set_xlabel("held-out perplexity / teacher's")
    axes[0].legend()
    axes[1].barh(names, [r["decode_ms_8k"] for r in done], color="tab:orange")
    if done:
        axes[1].axvline(done[0]["teacher_decode_ms_8k"], color="tab:green", linestyle="--",
                        label="teacher (KV cache)")
        axes[1].legend()
    axes[1].set_xlabel("decode ms/token at 8k context")
    for ax in axes:
        ax.grid(True, axis="x", alpha=0.3)
        ax.invert_yaxis()
    axes[1].set_yticks(range(len(names)), [""] * len(names))
    fig.suptitle("linearising the demo teacher: one token budget, one change per row")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@register_bench(
    "linearize-ablation",
    "LoLCATs recipe ablation on the demo teacher: window, feature map, rotary, LoRA, Mamba-2",
    plot=ablation_plot, report=ablation_report,
)
def bench_linearize_ablation(options: BenchOptions) -> list[dict]:
    from zoo.layers import MIXERS, options_of
    from zoo.train.distill import Distiller, distill_config_from_dict

    out = Path(options.out_dir) / "linearize-ablation"
    teacher_dir(out, options.quick)
    context = 512 if options.quick else 8192
    rows, teacher_decode = [], None
    variants = VARIANTS[:2] if options.quick else VARIANTS
    for name, change, mixer, distill in variants:
        missing = [k for k in mixer if k != "type" and k not in options_of(MIXERS[mixer["type"]])]
        if missing:
            rows.append({"variant": name, "change": change, "skipped": f"{missing} unsupported"})
            continue
        torch.manual_seed(0)
        start = time.perf_counter()
        try:
            run = distill_config_from_dict(student_run(out, name, mixer, distill, options.quick))
        except ValueError as error:  # a recipe option this zoo does not have yet
            rows.append({"variant": name, "change": change, "skipped": str(error)[:120]})
            continue
        distiller = Distiller(run, overwrite=True, progress=False)
        summary = distiller.fit()
        student = distiller.student.eval()
        if teacher_decode is None:
            teacher_decode = time_decode(distiller.teacher.model.eval(), context, 8,
                                         real_prefill=256)
        decode = time_decode(student, context, 8, real_prefill=256)
        rows.append({
            "variant": name, "change": change, "mixer": mixer, "distill": distill,
            # what was built: inherited options (rotary base, heads) and what was copied
            "student_mixer": dict(student.config.mixer),
            "copied_mixer_tensors": sum(".mixer." in n for n in distiller.report.copied),
            "student_ppl": summary["student_val_ppl"], "teacher_ppl": summary["teacher_val_ppl"],
            "ppl_ratio": summary["student_val_ppl"] / summary["teacher_val_ppl"],
            "val_tokens": summary["val_tokens"], "tokens_seen": summary["tokens_seen"],
            "decode_ms_8k": decode.ms_per_token, "state_bytes_8k": decode.state_bytes,
            "teacher_decode_ms_8k": teacher_decode.ms_per_token,
            "teacher_state_bytes_8k": teacher_decode.state_bytes, "context": context,
            "seconds": time.perf_counter() - start,
        })
        print(f"{name}: student ppl {rows[-1]['student_ppl']:.3f} "
              f"(x{rows[-1]['ppl_ratio']:.3f}), {decode.summary()}", flush=True)
    return rows
