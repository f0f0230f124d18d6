"""Model-level benchmarks: a training step and per-token decoding of any config.

The attention baseline is the first tenant; other families reuse `train_step_sweep` and
`decode_sweep` (the one decode timer, zoo.app.decode_timer) with their own configs.
"""

from __future__ import annotations

import time

import torch

from zoo.app.bench.harness import BenchOptions, line_plot, measure, register_bench
from zoo.app.decode_timer import time_decode
from zoo.config import ZooConfig, load_config
from zoo.model import ZooForCausalLM


def build_model(config: ZooConfig | str, device: str, seed: int = 0) -> ZooForCausalLM:
    torch.manual_seed(seed)
    config = load_config(config) if isinstance(config, str) else config
    return ZooForCausalLM(config).to(device)


def train_step_seconds(model, batch: int, seq_len: int, options: BenchOptions) -> dict:
    """Forward + backward + AdamW step on random tokens."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=options.device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        optimizer.step()

    return measure(step, device=options.device, warmup=options.warmup,
                   repeats=max(1, options.repeats // 2))


def sizes(options: BenchOptions, quick: list[int], full: list[int]) -> list[int]:
    return quick if options.quick else full


def _within_budget(configs: list[str], sizes: list[int], options: BenchOptions):
    """(config, model, size) for each config and size, until options.budget_s has passed."""
    start = time.perf_counter()
    for config in configs:
        model = build_model(config, options.device)
        for size in sizes:
            if time.perf_counter() - start > options.budget_s:
                break
            yield config, model, size


def train_step_sweep(
    configs: list[str], seq_lens: list[int], options: BenchOptions, batch: int = 4
) -> list[dict]:
    """A training step of each config at each length, while options.budget_s lasts."""
    rows = []
    for config, model, seq_len in _within_budget(configs, seq_lens, options):
        t = train_step_seconds(model, batch, seq_len, options)
        rows.append({"config": config, "batch": batch, "seq_len": seq_len,
                     "step_ms": 1e3 * t["median_s"],
                     "ms_per_token": 1e3 * t["median_s"] / (batch * seq_len)})
    return rows


def decode_sweep(
    configs: list[str], contexts: list[int], options: BenchOptions, steps: int = 16
) -> list[dict]:
    """Decode ms/token and state bytes of each config at each context, within the budget."""
    rows = []
    for config, model, context in _within_budget(configs, contexts, options):
        timing = time_decode(model, context, steps)
        rows.append({"config": config, "context": context,
                     "decode_ms_per_token": timing.ms_per_token,
                     "state_bytes": timing.state_bytes,
                     "achieved_GB_per_s": timing.achieved_GB_per_s})
    return rows


@register_bench(
    "attention-train-step",
    "training step (fwd+bwd+AdamW) of attention-tiny, batch 4, vs sequence length",
    plot=lambda rows, path: line_plot(rows, path, x="seq_len", y="ms_per_token", series="config",
                                      title="training step time per token"),
)
def bench_attention_train(options: BenchOptions) -> list[dict]:
    return train_step_sweep(["attention-tiny"], sizes(options, [64, 128], [256, 512, 1024, 2048,
                                                                           4096]), options)


@register_bench(
    "attention-decode",
    "decode ms/token of attention-tiny through its KV cache vs context length",
    plot=lambda rows, path: line_plot(rows, path, x="context", y="decode_ms_per_token",
                                      series="config", title="decode cost per token"),
)
def bench_attention_decode(options: BenchOptions) -> list[dict]:
    return decode_sweep(["attention-tiny"], sizes(options, [32, 128], [128, 1024, 8192]), options)
