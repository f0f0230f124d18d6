"""`decode-attention-op`: one query per head against a KV cache, per call, at growing context.

The implementations a CPU user could run for attention's decode step: zoo's C++ kernel, the
PyTorch path eager and under torch.compile (two products and a softmax over the transposed
keys), and the peer, torch's scaled_dot_product_attention over time-major keys as
transformers' caches hold them. Reported per call and as the cache's bytes read per second.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from zoo.app.bench import harness
from zoo.app.bench.harness import BenchOptions, line_plot, measure, register_bench
from zoo.kernels import decode_attention
from zoo.kernels.decode_attention import cpu

CALLS = 20  # calls per timed repeat

# (name, query heads, KV heads, head dim): the tiny configs' and SmolLM2-135M's
SHAPES = [("tiny (4q/2kv x 16)", 4, 2, 16), ("smollm2 (9q/3kv x 64)", 9, 3, 64)]


def _implementations(device: str) -> dict:
    """Each takes the query, the cache's buffers, the filled length and time-major keys."""

    def op(backend: str):
        def run(q, keys_t, values, length, keys):
            # slicing inside: a compiled decode step slices its cache in the graph
            return decode_attention(q, keys_t[..., :length], values[:, :, :length],
                                    backend=backend)

        return run

    def sdpa(q, keys_t, values, length, keys):
        return F.scaled_dot_product_attention(q[:, :, None], keys, values[:, :, :length],
                                              enable_gqa=True)

    impls = {}
    if torch.device(device).type == "cpu" and cpu.load():
        impls["zoo C++ kernel"] = op("cpu")
    if torch.device(device).type == "cuda":
        impls["zoo triton"] = op("triton")
    impls["torch (eager)"] = op("torch")
    # as in a compiled decode step: static shapes first, then only the length dynamic
    impls["torch (compiled)"] = torch.compile(op("torch"))
    impls["sdpa, time-major keys (peer)"] = sdpa
    return impls


def _plot(rows: list[dict], path) -> None:
    line_plot([dict(r, series=f"{r['shape']}: {r['impl']}") for r in rows], path, x="L",
              y="us_min", series="series",
              title=f"decode_attention op, us per call ({rows[0]['device']})")


def _report(rows: list[dict]) -> str:
    """The table, then the C++ kernel against the compiled PyTorch path and SDPA per cell."""
    lines = [harness.format_rows(rows), ""]
    cells = {(r["shape"], r["L"], r["impl"]): r["us_min"] for r in rows}
    for shape, L in dict.fromkeys((r["shape"], r["L"]) for r in rows):
        kernel = cells.get((shape, L, "zoo C++ kernel"))
        if kernel is None:
            continue
        compiled = cells[(shape, L, "torch (compiled)")]
        peer = cells[(shape, L, "sdpa, time-major keys (peer)")]
        lines.append(f"{shape}, L={L}: C++ kernel {kernel:.1f} us, x{compiled / kernel:.1f} "
                     f"faster than the compiled PyTorch path, x{peer / kernel:.1f} than SDPA")
    return "\n".join(lines)


@register_bench(
    "decode-attention-op",
    "decode_attention op: one query per head against an L-token KV cache (us per call and "
    "GB/s of cache read), zoo's C++ kernel and PyTorch path vs SDPA",
    plot=_plot,
    report=_report,
)
@torch.no_grad()
def bench_decode_attention_op(options: BenchOptions) -> list[dict]:
    device = options.device
    lengths = [64, 256] if options.quick else [128, 1024, 8192, 32768]
    impls = _implementations(device)
    rows, start = [], time.perf_counter()
    for shape, H, H_kv, D in SHAPES:
        # a fresh compile per head shape: dynamo would otherwise turn every size that differs
        # between the shapes dynamic, where a decode step's graph has only its length dynamic
        torch._dynamo.reset()
        for L in lengths:
            if time.perf_counter() - start > options.budget_s:
                break
            q = torch.randn(1, H, D, device=device)
            keys_t = torch.randn(1, H_kv, D, L + 64, device=device)  # buffers with spare slots
            values = torch.randn(1, H_kv, L + 64, D, device=device)
            keys = keys_t[..., :L].transpose(2, 3).contiguous()
            cache_bytes = 2 * L * H_kv * D * 4
            for impl, fn in impls.items():
                fn(q, keys_t, values, L, keys)  # compiles, builds, warms

                def calls(fn=fn, args=(q, keys_t, values, L, keys)):
                    for _ in range(CALLS):
                        fn(*args)

                result = measure(calls, device=device, warmup=options.warmup,
                                 repeats=options.repeats)
                us = 1e6 * result["min_s"] / CALLS
                rows.append({
                    "impl": impl, "shape": shape, "L": L, "device": harness.device_name(device),
                    "us_min": us, "us_median": 1e6 * result["median_s"] / CALLS,
                    "cache_bytes": cache_bytes, "cache_GB_per_s": cache_bytes / us / 1e3,
                    "threads": torch.get_num_threads(),
                })
    return rows
