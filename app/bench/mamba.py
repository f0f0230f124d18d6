"""Mamba benchmarks: a training step of a 4-layer d_model 256 Mamba against transformers'
MambaForCausalLM of the same shape (same machine, same run), and per-token decoding against
the context length (flat: the state is a fixed-size (conv, ssm) pair per layer).

transformers' CPU fallback scans token by token in Python (its fast path needs mamba_ssm's CUDA
kernels), and its backward grows faster than linearly in the length (each step's slice of the
discretised (B, D, T, N) tensors sends back a full-length gradient), so its step takes minutes.
It is timed once, after a probe at a quarter of the length, extrapolated quadratically, predicts
that the full step fits the remaining budget.
"""

from __future__ import annotations

import time

import torch

from zoo.app.bench.harness import BenchOptions, line_plot, measure, register_bench
from zoo.app.decode_timer import time_decode
from zoo.config import ZooConfig
from zoo.model import ZooForCausalLM

BATCH, SEQ_LEN, D_MODEL, N_LAYERS = 4, 512, 256, 4
QUICK = {"batch": 2, "seq_len": 64, "d_model": 64, "n_layers": 2}
VOCABS = (256, 50280)  # byte-level as zoo's tiny configs; GPT-NeoX's as mamba-130m


def zoo_mamba(vocab: int, d_model: int, n_layers: int, mixer: str = "mamba") -> ZooForCausalLM:
    torch.manual_seed(0)
    config = ZooConfig(vocab_size=vocab, d_model=d_model, n_layers=n_layers,
                       mixer={"type": mixer}, ffn=None, norm="rms", norm_eps=1e-5)
    return ZooForCausalLM(config)


def hf_mamba(vocab: int, d_model: int, n_layers: int):
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    return MambaForCausalLM(MambaConfig(vocab_size=vocab, hidden_size=d_model,
                                        num_hidden_layers=n_layers, state_size=16, expand=2,
                                        conv_kernel=4))


def _step_fn(model, batch: int, seq_len: int, device: str):
    """One training step: forward, backward and an AdamW update, on random tokens."""
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        optimizer.step()

    return step


def _once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@register_bench(
    "mamba-train-step",
    "training step (fwd+bwd+AdamW) of a 4-layer d_model 256 Mamba, 4 x 512 tokens: zoo vs "
    "transformers' MambaForCausalLM (timed once, budget permitting)",
    plot=lambda rows, path: line_plot(rows, path, x="vocab", y="step_s", series="impl",
                                      title="Mamba training step, 4 x 512 tokens"),
)
def bench_mamba_train(options: BenchOptions) -> list[dict]:
    shape = QUICK if options.quick else {"batch": BATCH, "seq_len": SEQ_LEN, "d_model": D_MODEL,
                                         "n_layers": N_LAYERS}
    batch, seq_len = shape["batch"], shape["seq_len"]
    vocabs = VOCABS[:1] if options.quick else VOCABS
    rows, start = [], time.perf_counter()
    for vocab in vocabs:
        common = {"vocab": vocab, **shape}
        for mixer in ("mamba", "mamba2"):
            model = zoo_mamba(vocab, shape["d_model"], shape["n_layers"], mixer)
            t = measure(_step_fn(model, batch, seq_len, options.device), device=options.device,
                        warmup=options.warmup, repeats=max(1, options.repeats // 2))
            rows.append({"impl": f"zoo {mixer}", **common, "step_s": t["median_s"],
                         "step_min_s": t["min_s"], "measured": True})
        if options.quick:
            continue  # the transformers baseline takes minutes
        zoo_s, zoo_min_s = rows[-2]["step_s"], rows[-2]["step_min_s"]
        hf = hf_mamba(vocab, shape["d_model"], shape["n_layers"])
        probe = _once(_step_fn(hf, batch, seq_len // 4, options.device))
        predicted = probe * 16
        left = options.budget_s - (time.perf_counter() - start)
        if predicted < left:
            hf_s, measured = _once(_step_fn(hf, batch, seq_len, options.device)), True
        else:
            hf_s, measured = predicted, False  # not run: reported as the probe's prediction
        rows.append({"impl": "transformers MambaForCausalLM", **common, "step_s": hf_s,
                     "measured": measured, "probe_seq_len": seq_len // 4, "probe_s": probe,
                     "zoo_speedup": hf_s / zoo_s,
                     # the least-disturbed zoo step, for machines shared with other jobs
                     "zoo_speedup_vs_min": hf_s / zoo_min_s})
    return rows


@register_bench(
    "mamba-decode",
    "decode ms/token of a 4-layer d_model 256 Mamba (and Mamba-2) vs context length, 128 to 8k",
    plot=lambda rows, path: line_plot(rows, path, x="context", y="decode_ms_per_token",
                                      series="impl", title="decode cost per token", logy=False),
)
def bench_mamba_decode(options: BenchOptions) -> list[dict]:
    d_model, n_layers = (64, 2) if options.quick else (D_MODEL, N_LAYERS)
    contexts = [16, 64] if options.quick else [128, 512, 2048, 8192]
    steps = 4 if options.quick else 32
    rows, start = [], time.perf_counter()
    for mixer in ("mamba", "mamba2"):
        model = zoo_mamba(256, d_model, n_layers, mixer)
        model.to(options.device)
        time_decode(model, 16, 4)  # first-call costs stay out of the first row
        for context in contexts:
            if time.perf_counter() - start > options.budget_s:
                break
            timing = time_decode(model, context, steps)
            rows.append({
                "impl": f"zoo {mixer}", "d_model": d_model, "n_layers": n_layers,
                "context": context, "decode_ms_per_token": timing.ms_per_token,
                "decode_min_ms_per_token": timing.min_ms_per_token,
                "state_bytes": timing.state_bytes,
                # every step reads the weights and the state once
                "achieved_GB_per_s": timing.achieved_GB_per_s,
            })
    return rows
