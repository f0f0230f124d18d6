"""Mixture-of-experts benchmarks: the MoE FFN's throughput against the peers a user would pick
instead, and how evenly a trained router spreads the tokens.

`moe-ffn`: tokens/s of zoo's `moe` FFN (Mixtral shape: E experts, top-2, SwiGLU), of a dense
SwiGLU with the same active parameters per token (hidden = top_k * I), and of transformers'
MixtralSparseMoeBlock holding the same weights; forward alone and forward + backward.
`moe-balance`: moe-tiny trained a few hundred steps on synthetic text, with and without the
load-balancing loss; the fraction of routed slots per expert and its coefficient of variation.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from zoo.app.bench.harness import BenchOptions, line_plot, measure, register_bench
from zoo.config import load_config
from zoo.layers.ffn import SwiGLU
from zoo.layers.moe import MoE
from zoo.model import ZooForCausalLM


def _mixtral_block(moe: MoE, experts_implementation: str):
    """transformers' Mixtral sparse block of the same shape, with moe's weights copied in.

    experts_implementation: "eager" (the per-expert loop in modeling_mixtral.py) or
    "grouped_mm" (what MixtralForCausalLM.from_pretrained picks when torch can dispatch it).
    """
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=moe.d_model, intermediate_size=moe.hidden_size,
                           num_local_experts=moe.n_experts, num_experts_per_tok=moe.top_k)
    config._experts_implementation = experts_implementation
    block = MixtralSparseMoeBlock(config)
    block.load_state_dict(moe.state_dict())
    return block


def _pass_fn(module, x: torch.Tensor, backward: bool):
    def run():
        if backward:
            out = module(x)
            out = out[0] if isinstance(out, tuple) else out
            out.sum().backward()
        else:
            with torch.no_grad():
                module(x)

    return run


def _interleaved(fns: dict, options: BenchOptions) -> dict[str, dict[str, float]]:
    """Time every fn once per round, rounds interleaved, so that a busy neighbour on a shared
    machine slows all of them alike; per fn the median and the min over rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        measure(fn, device=options.device, warmup=options.warmup, repeats=1)  # warm-up
    for _ in range(options.repeats):
        for name, fn in fns.items():
            times[name].append(measure(fn, device=options.device, warmup=0, repeats=1)["min_s"])
    return {name: {"median_s": statistics.median(t), "min_s": min(t)} for name, t in times.items()}


@register_bench(
    "moe-ffn",
    "MoE FFN (8 experts, top-2, SwiGLU) tokens/s vs a dense SwiGLU of the same active "
    "parameters vs transformers' MixtralSparseMoeBlock, forward and forward+backward",
    plot=lambda rows, path: line_plot(
        [dict(r, series=f"{r['impl']} {r['pass']}") for r in rows], path, x="tokens",
        y="tokens_per_s", series="series", title="MoE FFN throughput", logy=True),
)
def bench_moe_ffn(options: BenchOptions) -> list[dict]:
    d_model, hidden, E, K = (128, 256, 8, 2) if options.quick else (512, 1024, 8, 2)
    sizes = [256] if options.quick else [256, 1024, 4096]
    torch.manual_seed(0)
    moe = MoE(d_model, n_experts=E, top_k=K, hidden_size=hidden).to(options.device)
    dense = SwiGLU(d_model, hidden_size=K * hidden).to(options.device)
    impls = {"zoo moe": moe, "dense swiglu (same active params)": dense}
    for impl in ("eager", "grouped_mm"):
        impls[f"transformers mixtral ({impl})"] = _mixtral_block(moe, impl).to(options.device)
    for module in impls.values():
        module.eval()  # no jitter, no capacity: all compute the same kind of thing
    rows, start = [], time.perf_counter()
    for n_tokens in sizes:
        if time.perf_counter() - start > options.budget_s:
            break
        x = torch.randn(1, n_tokens, d_model, device=options.device)
        for backward in (False, True):
            fns = {name: _pass_fn(module, x.clone().requires_grad_(backward), backward)
                   for name, module in impls.items()}
            for name, t in _interleaved(fns, options).items():
                # tokens/s from the fastest round: on a shared CPU the median mostly measures
                # the neighbours
                rows.append({"impl": name, "pass": "fwd+bwd" if backward else "fwd",
                             "tokens": n_tokens, "d_model": d_model, "expert_hidden": hidden,
                             "n_experts": E, "top_k": K, "ms_median": 1e3 * t["median_s"],
                             "ms_min": 1e3 * t["min_s"], "tokens_per_s": n_tokens / t["min_s"]})
    return rows


def _synthetic_batches(vocab: int, batch: int, seq_len: int, n_modes: int = 8, seed: int = 0):
    """Text from a mixture of sparse bigram models (each sequence picks one): enough structure
    for routers to specialise, so imbalance can arise and the aux loss has work to do."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_modes, vocab, vocab, generator=g) * 4.0
    probs = logits.softmax(-1)
    while True:
        mode = torch.randint(0, n_modes, (batch,), generator=g)
        ids = torch.empty(batch, seq_len, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        for t in range(1, seq_len):
            ids[:, t] = torch.multinomial(probs[mode, ids[:, t - 1]], 1, generator=g).squeeze(1)
        yield ids


def _load_rows(model: ZooForCausalLM, ids: torch.Tensor, label: str, steps: int) -> list[dict]:
    """Route a held-out batch (eval mode: no jitter, no capacity) and summarise each MoE layer."""
    model.eval()
    with torch.no_grad():
        model(ids)
    rows = []
    for i, block in enumerate(model.model.layers):
        if not isinstance(block.ffn, MoE):
            continue
        counts = block.ffn.last_stats["tokens_per_expert"].double()
        frac = counts / counts.sum()
        rows.append({
            "run": label, "steps": steps, "layer": i,
            "cv": (frac.std(unbiased=False) / frac.mean()).item(),
            "max_fraction": frac.max().item(), "min_fraction": frac.min().item(),
            "fractions": " ".join(f"{f:.3f}" for f in frac.tolist()),
            "load_balancing_loss": block.ffn.last_stats["load_balancing_loss"].item(),
        })
    return rows


@register_bench(
    "moe-balance",
    "expert-load balance of moe-tiny after a short training run on synthetic text, with and "
    "without the load-balancing loss (fraction of slots per expert, coefficient of variation)",
    plot=lambda rows, path: _balance_plot(rows, path),
)
def bench_moe_balance(options: BenchOptions) -> list[dict]:
    steps = 10 if options.quick else 300
    batch, seq_len = (4, 32) if options.quick else (8, 64)
    runs = {"aux_loss_coef=0.01": 0.01} if options.quick else {
        "aux_loss_coef=0.01": 0.01, "aux_loss_coef=0": 0.0}
    rows = []
    for label, coef in runs.items():
        config = load_config("moe-tiny", ffn={**load_config("moe-tiny").ffn, "aux_loss_coef": coef})
        torch.manual_seed(0)
        model = ZooForCausalLM(config).to(options.device)
        data = _synthetic_batches(config.vocab_size, batch, seq_len)
        held_out = next(_synthetic_batches(config.vocab_size, 16, seq_len, seed=1))
        held_out = held_out.to(options.device)
        if label == next(iter(runs)):
            rows += _load_rows(model, held_out, "untrained", 0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        dropped = routed = 0
        start = time.perf_counter()
        for _ in range(steps):
            ids = next(data).to(options.device)
            out = model(ids, labels=ids)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            for block in model.model.layers:
                if isinstance(block.ffn, MoE):
                    dropped += block.ffn.last_stats["dropped_per_expert"].sum().item()
                    routed += block.ffn.last_stats["tokens_per_expert"].sum().item()
        lm_loss = (out.loss - out.aux_loss).item()
        for row in _load_rows(model, held_out, label, steps):
            row.update(final_lm_loss=lm_loss, train_dropped_fraction=dropped / max(routed, 1),
                       train_s=time.perf_counter() - start)
            rows.append(row)
    return rows


def _balance_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    width = 0.8 / max(1, len(rows))
    for j, row in enumerate(rows):
        fractions = [float(f) for f in row["fractions"].split()]
        xs = [e + (j - (len(rows) - 1) / 2) * width for e in range(len(fractions))]
        ax.bar(xs, fractions, width=width,
               label=f"{row['run']} layer {row['layer']} (cv {row['cv']:.2f})")
    ax.axhline(1 / len(fractions), color="black", lw=0.8, ls="--")
    ax.set_xlabel("expert")
    ax.set_ylabel("fraction of routed slots")
    ax.set_title("moe-tiny expert load")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
