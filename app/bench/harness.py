"""The benchmark harness every `zoo bench NAME` entry plugs into.

An entry is a function `(options: BenchOptions) -> list[dict]` registered by name; each dict is
one measured row (plain numbers and strings). The harness adds what makes a number citable
(device, versions, commit, time), writes JSON, and, when the entry says how, a PNG.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


@dataclasses.dataclass
class BenchOptions:
    device: str = "cpu"
    quick: bool = False  # smallest sizes only: what the test suite runs
    repeats: int = 5
    warmup: int = 1
    budget_s: float = 600.0  # entries stop growing sizes past this wall time
    out_dir: Path = Path("runs/bench")
    only: tuple[str, ...] = ()  # the families an entry that has them runs (`--only`); () = all


@dataclasses.dataclass
class BenchEntry:
    name: str
    run: Callable[[BenchOptions], list[dict]]
    help: str
    plot: Callable[[list[dict], Path], None] | None = None
    # rows -> markdown (tables derived from the rows, e.g. fitted exponents); written as .md
    report: Callable[[list[dict]], str] | None = None
    families: tuple[str, ...] = ()  # what `--only` may choose from; () = the entry has none


BENCHES: dict[str, BenchEntry] = {}


def register_bench(
    name: str,
    help: str,
    plot: Callable[[list[dict], Path], None] | None = None,
    report: Callable[[list[dict]], str] | None = None,
    families: tuple[str, ...] = (),
):
    """Decorator: `@register_bench("attention-model", "what it measures")`.

    `families`: the names `--only` may choose from; the entry reads its choice from
    `only_families(options, families)`.

    `plot(rows, png_path)` may write more PNGs beside png_path (same stem, a suffix each).
    """

    def add(fn: Callable[[BenchOptions], list[dict]]):
        if name in BENCHES:
            raise ValueError(f"bench {name!r} is registered twice")
        BENCHES[name] = BenchEntry(name, fn, help, plot, report, tuple(families))
        return fn

    return add


def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(
    fn: Callable[[], Any], *, device: str = "cpu", warmup: int = 1, repeats: int = 5
) -> dict[str, float]:
    """Run fn warmup + repeats times; seconds per call as median and min."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times)}


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = _cpu_model() or platform.processor() or platform.machine()
    return f"{name} CPU, {os.cpu_count()} cores"


def _cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (Linux), e.g. "AMD EPYC"; None elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str) -> dict[str, Any]:
    import transformers

    info = {
        "device": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "commit": git_commit(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def report_header(name: str, env: dict[str, Any]) -> str:
    """The first lines of a written report: what ran, where, on which code."""
    return (f"`zoo bench {name}` on {env['device']}, {env['threads']} threads; torch "
            f"{env['torch']}, transformers {env['transformers']}; commit {env['commit']}, "
            f"{env['time']}\n\n")


def run_bench(name: str, options: BenchOptions, plot: bool = True) -> dict[str, Any]:
    """Run one registered entry; write <out_dir>/<name>.json (and .png); return the record."""
    if name not in BENCHES:
        raise ValueError(f"unknown bench {name!r}; registered: {sorted(BENCHES)}")
    entry = BENCHES[name]
    if options.only and not entry.families:
        raise ValueError(f"bench {name!r} has no families to choose: drop --only")
    only_families(options, entry.families)  # names an unknown family before any work
    rows = entry.run(options)
    record = {"bench": name, "environment": environment(options.device), "rows": rows}
    out_dir = Path(options.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)
    record["json"] = str(path)
    if entry.report is not None and rows:
        record["report"] = entry.report(rows)
        (out_dir / f"{name}.md").write_text(
            report_header(name, record["environment"]) + record["report"] + "\n")
    if plot and entry.plot is not None and rows:
        try:
            entry.plot(rows, out_dir / f"{name}.png")
            record["png"] = str(out_dir / f"{name}.png")
        except ImportError:
            record["png"] = None  # matplotlib is the `bench` extra
    return record


def only_families(options: BenchOptions, families: tuple[str, ...]) -> list[str]:
    """The families of `families` that `options.only` keeps (all of them without --only), in
    the entry's order; an unknown name is an error naming the allowed ones."""
    unknown = [name for name in options.only if name not in families]
    if unknown:
        raise ValueError(f"--only {unknown[0]!r} is not a family of this bench; "
                         f"choose from {', '.join(families)}")
    return [f for f in families if not options.only or f in options.only]


def format_rows(rows: list[dict]) -> str:
    """A markdown table of the rows (union of keys, in first-seen order)."""
    if not rows:
        return "(no rows)"
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]

    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def line_plot(
    rows: list[dict], path: Path, *, x: str, y: str, series: str, title: str,
    logx: bool = True, logy: bool = True,
) -> None:
    """One line per value of `series`, y against x: the plot most benchmarks want."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label in dict.fromkeys(r[series] for r in rows):
        pts = sorted((r[x], r[y]) for r in rows if r[series] == label and r.get(y) is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=str(label))
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
