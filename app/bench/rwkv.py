"""RWKV benchmarks: training step and per-token decoding of rwkv4-tiny / rwkv6-tiny against the
attention baseline (attention-tiny) at several lengths, and the wkv4 op's backends.

RWKV's decode cost and state stay flat in the context length; attention's grow with it.
"""

from __future__ import annotations

import functools
import time

import torch

from zoo.app.bench.harness import BenchOptions, line_plot, measure, register_bench
from zoo.app.bench.model import decode_sweep, sizes, train_step_sweep
from zoo.kernels import wkv4

CONFIGS = ("rwkv4-tiny", "rwkv6-tiny", "attention-tiny")


@register_bench(
    "rwkv-train-step",
    "training step (fwd+bwd+AdamW), batch 4, of rwkv4-tiny / rwkv6-tiny vs attention-tiny",
    plot=lambda rows, path: line_plot(rows, path, x="seq_len", y="ms_per_token", series="config",
                                      title="training step time per token"),
)
def bench_rwkv_train(options: BenchOptions) -> list[dict]:
    seq_lens = sizes(options, [32, 64], [128, 256, 512, 1024, 2048])
    return train_step_sweep(list(CONFIGS), seq_lens, options)


@register_bench(
    "rwkv-decode",
    "decode ms/token and state bytes of rwkv4-tiny / rwkv6-tiny vs attention-tiny vs context",
    plot=lambda rows, path: line_plot(rows, path, x="context", y="decode_ms_per_token",
                                      series="config", title="decode cost per token"),
)
def bench_rwkv_decode(options: BenchOptions) -> list[dict]:
    contexts = sizes(options, [16, 64], [128, 1024, 4096])
    return decode_sweep(list(CONFIGS), contexts, options, steps=4 if options.quick else 16)


def _wkv4_forward_backward(inputs: list[torch.Tensor], backend: str) -> None:
    y, _ = wkv4(*inputs, backend=backend)
    y.sum().backward()


@register_bench(
    "wkv4-op",
    "wkv4 forward+backward, B=4, C=256: reference loop vs chunked torch (vs Triton on CUDA)",
    plot=lambda rows, path: line_plot(rows, path, x="seq_len", y="ms", series="backend",
                                      title="wkv4 forward + backward"),
)
def bench_wkv4_op(options: BenchOptions) -> list[dict]:
    device = options.device
    backends = ["reference", "torch"] + (["triton"] if torch.device(device).type == "cuda" else [])
    B, C = 4, 256
    rows, start = [], time.perf_counter()
    for seq_len in sizes(options, [64, 128], [256, 1024, 4096]):
        inputs = [torch.randn(C, device=device), torch.randn(C, device=device),
                  torch.randn(B, seq_len, C, device=device),
                  torch.randn(B, seq_len, C, device=device)]
        inputs = [t.requires_grad_() for t in inputs]
        for backend in backends:
            if time.perf_counter() - start > options.budget_s:
                break
            result = measure(functools.partial(_wkv4_forward_backward, inputs, backend),
                             device=device, warmup=options.warmup,
                             repeats=max(1, options.repeats // 2))
            rows.append({"backend": backend, "batch": B, "channels": C, "seq_len": seq_len,
                         "ms": 1e3 * result["median_s"]})
    return rows
