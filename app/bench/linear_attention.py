"""`linear-attention-op`: the linear_attention op's cost per token, training and decoding.

Training: forward + backward of the chunked op at growing T; linear in T means a flat time per
token. Decoding: single-token calls carrying the (B, H, K, V) state after a prefill of T
tokens; a constant-size state means a flat cost per token whatever T. The peer a user would
pick instead is causal softmax attention (torch's scaled_dot_product_attention), timed the
same way: training cost per token grows with T, and a decode step reads a KV cache of T tokens.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from zoo.app.bench.harness import BenchOptions, line_plot, measure, register_bench
from zoo.kernels import linear_attention

DECODE_STEPS = 8  # single-token calls per timed repeat


def _decay(form: str, B: int, T: int, H: int, K: int, device: str) -> torch.Tensor:
    if form == "head":  # RetNet's gammas 1 - 2^(-5 - h)
        return torch.log1p(-torch.exp2(-5.0 - torch.arange(H, device=device)))
    return F.logsigmoid(torch.randn(B, T, H, K, device=device))  # GLA-style gates


def _train_row(backend: str, form: str, B, T, H, K, V, options: BenchOptions) -> dict:
    device = options.device
    q, k = torch.randn(B, T, H, K, device=device), torch.randn(B, T, H, K, device=device)
    v = torch.randn(B, T, H, V, device=device)
    decay = _decay(form, B, T, H, K, device)
    leaves = [t.requires_grad_() for t in (q, k, v) + ((decay,) if form == "channel" else ())]

    def step():
        for t in leaves:
            t.grad = None
        o, _ = linear_attention(q, k, v, decay=decay, scale=K**-0.5, backend=backend)
        o.sum().backward()

    return measure(step, device=device, warmup=options.warmup, repeats=options.repeats)


def _softmax_train_row(B, T, H, K, V, options: BenchOptions) -> dict:
    device = options.device
    q, k = (torch.randn(B, H, T, K, device=device, requires_grad=True) for _ in range(2))
    v = torch.randn(B, H, T, V, device=device, requires_grad=True)

    def step():
        for t in (q, k, v):
            t.grad = None
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    return measure(step, device=device, warmup=options.warmup, repeats=options.repeats)


@torch.no_grad()
def _decode_row(backend: str, form: str, B, T, H, K, V, options: BenchOptions) -> dict:
    device = options.device
    q, k = torch.randn(B, T, H, K, device=device), torch.randn(B, T, H, K, device=device)
    v = torch.randn(B, T, H, V, device=device)
    decay = _decay(form, B, T, H, K, device)
    _, state = linear_attention(q, k, v, decay=decay, scale=K**-0.5, output_final_state=True,
                                backend=backend)
    step_decay = decay if decay.dim() == 1 else decay[:, -1:]
    q1, k1, v1 = q[:, -1:], k[:, -1:], v[:, -1:]

    def decode():
        nonlocal state
        for _ in range(DECODE_STEPS):
            _, state = linear_attention(q1, k1, v1, decay=step_decay, scale=K**-0.5,
                                        initial_state=state, output_final_state=True,
                                        backend=backend)

    result = measure(decode, device=device, warmup=1, repeats=options.repeats)
    return {name: seconds / DECODE_STEPS for name, seconds in result.items()}


@torch.no_grad()
def _softmax_decode_row(B, T, H, K, V, options: BenchOptions) -> dict:
    """One query against a preallocated KV cache holding T tokens (the cache write included)."""
    device = options.device
    k_cache = torch.randn(B, H, T + DECODE_STEPS, K, device=device)
    v_cache = torch.randn(B, H, T + DECODE_STEPS, V, device=device)
    q1, k1, v1 = (torch.randn(B, H, 1, d, device=device) for d in (K, K, V))

    def decode():
        for i in range(DECODE_STEPS):
            k_cache[:, :, T + i - 1 : T + i] = k1
            v_cache[:, :, T + i - 1 : T + i] = v1
            F.scaled_dot_product_attention(q1, k_cache[:, :, : T + i], v_cache[:, :, : T + i])

    result = measure(decode, device=device, warmup=1, repeats=options.repeats)
    return {name: seconds / DECODE_STEPS for name, seconds in result.items()}


def _plot(rows: list[dict], path) -> None:
    line_plot([dict(r, series=f"{r['phase']}: {r['impl']}") for r in rows], path, x="T",
              y="us_per_token_min", series="series",
              title=f"linear_attention op, time per token ({rows[0]['device']})")


@register_bench(
    "linear-attention-op",
    "linear_attention op: fwd+bwd time per token at growing T (flat = linear in T) and "
    "per-token decode cost with a carried state (flat), vs causal softmax attention (sdpa)",
    plot=_plot,
)
def bench_linear_attention_op(options: BenchOptions) -> list[dict]:
    device = options.device
    if options.quick:
        B, H, K, V, lengths, forms = 1, 2, 32, 32, [64, 256], ["head", "channel"]
    else:
        B, H, K, V = 1, 4, 64, 64
        lengths, forms = [256, 512, 1024, 2048, 4096, 8192], ["head", "channel"]
    backends = ["torch", "triton"] if torch.device(device).type == "cuda" else ["torch"]
    # triton on CPU runs through the interpreter: a correctness tool, not a timing
    impls = [(f"{backend} ({form} decay)", backend, form) for backend in backends
             for form in forms]
    device_name = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "cpu"
    rows, start = [], time.perf_counter()

    def add(phase: str, impl: str, T: int, result: dict) -> None:
        rows.append({
            "phase": phase, "impl": impl, "device": device_name, "T": T, "B": B, "H": H,
            "K": K, "V": V, "ms_median": 1e3 * result["median_s"], "ms_min": 1e3 * result["min_s"],
            # per token of the batch's sequence: train divides by T, decode is one token
            "us_per_token_min": 1e6 * result["min_s"] / (T if phase == "train" else 1),
        })

    for T in lengths:
        if time.perf_counter() - start > options.budget_s:
            break
        for impl, backend, form in impls:
            add("train", impl, T, _train_row(backend, form, B, T, H, K, V, options))
            add("decode", impl, T, _decode_row(backend, form, B, T, H, K, V, options))
        add("train", "softmax sdpa", T, _softmax_train_row(B, T, H, K, V, options))
        add("decode", "softmax sdpa (KV cache)", T, _softmax_decode_row(B, T, H, K, V, options))
    return rows
