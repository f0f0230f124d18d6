"""`zoo distill` and its report: fit a distillation run, then time teacher and student decoding
(the one decode timer) and write <stem>.md / .json / .png."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from zoo.app.bench.harness import device_name
from zoo.app.decode_timer import time_decode
from zoo.model import ZooForCausalLM
from zoo.train.distill import Distiller, load_distill_config

# prefill this many real tokens and fill longer KV caches synthetically (see time_decode)
REAL_PREFILL = 256
DECODE_STEPS = 8


def measure_decode(models: Mapping[str, ZooForCausalLM], contexts: Sequence[int],
                   progress: bool = True) -> list[dict[str, Any]]:
    """Rows (model, context, ms_per_token, state_bytes, achieved_GB_per_s, ...) of every model
    at every context, batch 1."""
    rows = []
    for name, model in models.items():
        for context in tqdm(contexts, desc=f"decode {name}", disable=not progress, leave=False):
            timing = time_decode(model, context, DECODE_STEPS, real_prefill=REAL_PREFILL)
            rows.append({"model": name, **timing.row()})
    return rows


def write_report(summary: Mapping[str, Any], decode: list[dict[str, Any]], stem: Path, *,
                 device: str, title: str, notes: Sequence[str] = (),
                 samples: Mapping[str, str] | None = None) -> dict[str, Path]:
    """<stem>.md, <stem>.json and <stem>.png (a copy of the run's distill.png)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    gap = summary["student_val_ppl"] - summary["teacher_val_ppl"]
    ratio = summary["student_val_ppl"] / summary["teacher_val_ppl"]
    lines = [
        f"# {title}", "",
        f"Device: {device}. Teacher `{summary['teacher']}`; student: "
        f"{_layers_text(summary['student'])} ({summary['student_parameters']:,} parameters).", "",
        "| | teacher | student |", "|---|---|---|",
        f"| held-out perplexity ({summary['val_tokens']:,} tokens) | "
        f"{summary['teacher_val_ppl']:.3f} | {summary['student_val_ppl']:.3f} |",
        f"| held-out loss (nats/token) | {summary['teacher_val_loss']:.4f} | "
        f"{summary['student_val_loss']:.4f} |",
    ]
    by_model: dict[str, dict[int, dict]] = {}
    for row in decode:
        by_model.setdefault(row["model"], {})[row["context"]] = row
    contexts = sorted({row["context"] for row in decode})
    for c in contexts:
        cells = [by_model.get(m, {}).get(c) for m in ("teacher", "student")]
        lines.append(f"| decode ms/token at {c:,} context | " + " | ".join(
            f"{r['ms_per_token']:.1f} (state {r['state_bytes'] / 2**20:.1f} MiB, "
            f"{r['achieved_GB_per_s']:.1f} GB/s)" if r else "-"
            for r in cells) + " |")
    lines += [
        "",
        f"**Gap: the student's perplexity is {ratio:.2f}x the teacher's "
        f"(+{gap:.2f}).**", "",
        f"Tokens seen: {summary['tokens_seen']:,} "
        f"(attention transfer {(summary.get('transfer') or {}).get('tokens', 0):,}, KD "
        f"{summary['kd_tokens']:,} in {summary['kd_steps']} steps). Time: "
        f"{summary['seconds']:.0f} s in all (transfer {summary['transfer_seconds']:.0f} s, KD "
        f"{summary['kd_seconds']:.0f} s).",
    ]
    transfer = summary.get("transfer")
    if transfer:
        before = transfer["mse_before"]
        after = transfer["mse_after"]
        mean_b = sum(before.values()) / max(len(before), 1)
        mean_a = sum(after.values()) / max(len(after), 1)
        lines.append(
            f"Attention transfer: mean per-layer output MSE {mean_b:.4g} -> {mean_a:.4g}; "
            f"student perplexity {transfer['val_ppl_before']:.2f} before it, "
            f"{transfer['val_ppl_after']:.2f} after it.")
    if samples:
        lines += ["", "## Samples (greedy)", ""]
        for name, text in samples.items():
            lines += [f"{name}:", "", "```", text, "```", ""]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    md = stem.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    js = stem.with_suffix(".json")
    js.write_text(json.dumps({"device": device, "summary": dict(summary), "decode": decode,
                              "notes": list(notes), "samples": dict(samples or {})}, indent=1))
    png = stem.with_suffix(".png")
    if summary.get("plot") and Path(summary["plot"]).exists():
        shutil.copyfile(summary["plot"], png)
    return {"md": md, "json": js, "png": png}


def _layers_text(layers: Sequence[str]) -> str:
    counts: dict[str, int] = {}
    for line in layers:
        counts[line] = counts.get(line, 0) + 1
    return ", ".join(f"{n} x {line}" for line, n in counts.items())


def distill_cli(run: str, overrides: Sequence[str], *, resume: bool, overwrite: bool,
                progress: bool, report: str | None, contexts: Sequence[int]) -> dict[str, Any]:
    """What `zoo distill` runs: fit, print, and optionally measure decode and write a report."""
    config = load_distill_config(run, overrides)
    distiller = Distiller(config, resume=resume, overwrite=overwrite, progress=progress)
    summary = distiller.fit()
    if report and not summary["interrupted"]:
        models = {"student": distiller.student}
        if distiller.teacher.is_zoo:
            models["teacher"] = distiller.teacher.model
        decode = measure_decode(models, contexts, progress=progress)
        summary["report"] = {k: str(v) for k, v in write_report(
            summary, decode, Path(report), device=device_name(distiller.device),
            title=f"{config.name}: distillation of {config.teacher.source}").items()}
    return summary


