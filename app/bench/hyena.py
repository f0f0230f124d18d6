"""Hyena benchmarks: training step and per-token decoding of hyena-tiny against the attention
baseline (attention-tiny) at several lengths, and the fft_conv op's forms.

Neither model has a constant-size decode: attention reads its KV cache, Hyena's cached form
reads every past input of each long convolution (O(context) per token, N * d values per token
of state). The op entry measures where the direct form stops paying against the FFT.
"""

from __future__ import annotations

import time

import torch

from zoo.app.bench.harness import BenchOptions, line_plot, measure, register_bench
from zoo.app.bench.model import decode_sweep, sizes, train_step_sweep
from zoo.kernels import fft_conv

CONFIGS = ("hyena-tiny", "attention-tiny")


@register_bench(
    "hyena-train-step",
    "training step (fwd+bwd+AdamW), batch 4, of hyena-tiny (FFT long convolutions) vs "
    "attention-tiny, vs sequence length",
    plot=lambda rows, path: line_plot(rows, path, x="seq_len", y="ms_per_token", series="config",
                                      title="training step time per token"),
)
def bench_hyena_train(options: BenchOptions) -> list[dict]:
    seq_lens = sizes(options, [32, 64], [128, 256, 512, 1024, 2048, 4096])
    return train_step_sweep(list(CONFIGS), seq_lens, options)


@register_bench(
    "hyena-decode",
    "decode ms/token and state bytes of hyena-tiny (cached long convolutions) vs attention-tiny "
    "vs context: both grow with the context (neither state is bounded)",
    plot=lambda rows, path: line_plot(rows, path, x="context", y="decode_ms_per_token",
                                      series="config", title="decode cost per token"),
)
def bench_hyena_decode(options: BenchOptions) -> list[dict]:
    # hyena-tiny's max_len is 4096: the last context leaves room for the timed steps
    contexts = sizes(options, [16, 64], [128, 512, 2048, 3968])
    return decode_sweep(list(CONFIGS), contexts, options, steps=4 if options.quick else 16)


@register_bench(
    "fft-conv",
    "fft_conv forward, B=1, D=384: FFT vs direct (torch; Triton on CUDA) for T new outputs "
    "after a history P, the rule behind backend='auto'",
    plot=lambda rows, path: line_plot(rows, path, x="T", y="ms", series="series",
                                      title="fft_conv: T new outputs after a history"),
)
def bench_fft_conv(options: BenchOptions) -> list[dict]:
    device = options.device
    forms = {"fft": "fft", "direct-torch": "direct"}
    if torch.device(device).type == "cuda":
        forms["direct-triton"] = "triton"
    B, D = 1, 384
    rows, start = [], time.perf_counter()
    for P in sizes(options, [64], [128, 1024, 4096]):
        for T in sizes(options, [1, 8], [1, 2, 4, 8, 16, 64, 256]):
            u = torch.randn(B, T, D, device=device)
            past = torch.randn(B, P, D, device=device)
            k = torch.randn(D, P + T, device=device)
            for form, how in forms.items():
                if time.perf_counter() - start > options.budget_s:
                    break
                run = _form(how, u, k, past)
                result = measure(run, device=device, warmup=options.warmup,
                                 repeats=options.repeats)
                rows.append({"form": form, "P": P, "T": T, "D": D,
                             "ms": 1e3 * result["median_s"], "series": f"{form}, P={P}"})
    return rows


def _form(how: str, u, k, past):
    from zoo.kernels.fft_conv import fft_conv_direct, fft_conv_fft

    if how == "fft":
        return lambda: fft_conv_fft(u, k, None, past)
    if how == "direct":
        return lambda: fft_conv_direct(u, k, None, past)
    return lambda: fft_conv(u, k, initial_state=past, backend="triton")
