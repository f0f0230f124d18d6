"""`zoo bench mqar`: multi-query associative recall measured as zoology measures it.

Zoology's figure 2 (Arora et al. 2023), scaled to a CPU: for each (sequence length, key-value
pairs) in (64, 4), (128, 8), (256, 16) and each d_model in 64, 128, 256, every family is a
two-layer model trained on MQAR from scratch and scored by its accuracy at the answer positions
of held-out sequences. What is kept from zoology: two layers, no FFN (its `state_mixer` is an
Identity for every family, so the sequence mixer alone must recall), tied embeddings, keys and
values from disjoint halves of the vocabulary, queries at power-law distances (power_a 0.01),
AdamW with a cosine schedule, training stopped once held-out accuracy reaches 0.99. What is
scaled down: the vocabulary (VOCAB_SIZE, not 8192: every embedding must be learnt in the few
hundred steps a CPU cell gets), the batch (2048 tokens, not 512 sequences), the training (a
step budget and Recipe.cell_s seconds per cell instead of 64 epochs of 100k sequences; a cell
stopped by the clock says so) and the learning rate, set by a rule instead of zoology's grid
of four (see `learning_rate`). On a CPU the clock binds first for most cells, so accuracy here
is recall reached in equal time; the table gives the steps each cell trained beside it.

Cells run in PRIORITY order (every family at one (length, d_model) before the next pair). A
`--budget-s` under cell_s / TRAIN_SHARE per cell (25 s: 2250 s for 90 cells) runs fewer cells
and the report names those that did not run; a larger one trains every cell longer.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from zoo.app.bench.harness import BenchOptions, only_families, register_bench
from zoo.config import ZooConfig
from zoo.layers import MIXERS
from zoo.model import ZooForCausalLM
from zoo.train.synthetic import IGNORE, MQAR

SWEEP: tuple[tuple[int, int], ...] = ((64, 4), (128, 8), (256, 16))  # (seq_len, kv pairs)
D_MODELS: tuple[int, ...] = (64, 128, 256)
N_LAYERS = 2
VOCAB_SIZE = 512  # > every seq_len, as zoology asserts; 8192 needs far more steps to learn
QUERY_GAP_POWER = 0.01  # zoology's power_a
HEAD_DIM = 64  # every multi-head family: heads = d_model / 64, so state grows with d_model
FAMILIES: tuple[str, ...] = ("attention", "linear_attention", "retnet", "mamba", "mamba2",
                             "rwkv6", "rwkv7", "hyena", "deltanet", "gated_deltanet")
# (seq_len, d_model) in the order the cells run: the middle length at the smallest width first,
# then the widest (how recall grows with the state), then the other lengths at the same two
# widths (how it falls with the length), the middle width last.
PRIORITY: tuple[tuple[int, int], ...] = ((128, 64), (128, 256), (256, 64), (64, 64), (256, 256),
                                         (64, 256), (128, 128), (256, 128), (64, 128))
SOLVED = 0.99  # zoology's early-stopping threshold on held-out accuracy
# of a cell's share of the budget, what training gets: building the model and scoring the
# held-out sets took the rest (a fifth to a quarter of a 20 s cell, Mamba's the most)
TRAIN_SHARE = 0.8


def mixer_spec(family: str, d_model: int, seq_len: int) -> dict:
    """The sequence mixer of `family` at this width: heads of HEAD_DIM channels where the family
    has heads, the family's own defaults otherwise."""
    heads = max(1, d_model // HEAD_DIM)
    specs = {
        "attention": {"type": "attention", "n_heads": heads},
        "linear_attention": {"type": "linear_attention", "n_heads": heads},
        "retnet": {"type": "retnet", "n_heads": heads},
        "mamba": {"type": "mamba", "d_state": 16, "expand": 2},
        "mamba2": {"type": "mamba2", "d_state": 64, "expand": 2, "head_dim": HEAD_DIM},
        "rwkv6": {"type": "rwkv6", "head_size": HEAD_DIM, "n_layers": N_LAYERS},
        "rwkv7": {"type": "rwkv7", "head_size": HEAD_DIM, "n_layers": N_LAYERS},
        "hyena": {"type": "hyena", "max_len": seq_len},
        "deltanet": {"type": "deltanet", "n_heads": heads},
        "gated_deltanet": {"type": "gated_deltanet", "n_heads": heads},
    }
    if family not in specs:
        raise ValueError(f"mqar family {family!r} is not one of {', '.join(FAMILIES)}")
    return specs[family]


def model_config(family: str, d_model: int, seq_len: int) -> ZooConfig:
    """Two blocks of [norm -> mixer], no FFN, tied embeddings: zoology's figure-2 model."""
    return ZooConfig(vocab_size=VOCAB_SIZE, d_model=d_model, n_layers=N_LAYERS,
                     mixer=mixer_spec(family, d_model, seq_len), ffn=None,
                     tie_word_embeddings=True)


def available_families() -> list[str]:
    """The families whose mixer is registered in this checkout (rwkv7 may not be yet)."""
    return [f for f in FAMILIES if mixer_spec(f, D_MODELS[0], SWEEP[0][0])["type"] in MIXERS]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How every cell trains: the same for all families, so accuracy compares mixers.

    Sizes are in tokens, so that every sequence length sees the same number of answers per
    step (tokens / seq_len sequences of seq_len / 16 queries each) and is scored on as many.
    """

    steps: int = 3000  # the step budget (the cosine's length); a cell stops earlier once
    # solved or out of time
    tokens_per_step: int = 2048  # batch = tokens / seq_len: 32, 16, 8 sequences
    warmup_steps: int = 30
    weight_decay: float = 0.1  # on matrices only (zoo's AdamW), as zoology's sweeps use
    eval_interval: int = 50  # steps between checks of the early-stopping set
    stop_tokens: int = 4096  # held-out tokens the early stop looks at (256 answers)
    test_tokens: int = 16384  # other held-out tokens, the reported accuracy (1024 answers)
    cell_s: float = 20.0  # least training wall time per cell: 90 cells in 30 minutes

    def batch_size(self, seq_len: int) -> int:
        return max(1, self.tokens_per_step // seq_len)


QUICK = Recipe(steps=4, tokens_per_step=256, warmup_steps=2, eval_interval=2, stop_tokens=256,
               test_tokens=512, cell_s=30.0)


def learning_rate(family: str) -> float:
    """1e-2, the top of zoology's figure-2 grid (1e-4 to 1e-2, four log-spaced); 3e-3 for
    softmax attention.

    Zoology takes the best of its grid per cell after thousands of steps; with the hundreds a
    CPU cell gets, the rate that starts recall soonest wins. Measured here: DeltaNet (seq_len
    128, d_model 64) at 0.91 after 770 steps at 1e-2, 0.11 after 860 at 3e-3; at d_model 256,
    0.17 against 0.02 at 5e-3 after 100. Softmax attention (seq_len 64, d_model 64), whose
    logits are quadratic in its weights, solved the task in 1450 steps at 3e-3 and stood at
    0.45 after 1230 at 1e-2.
    """
    return 3e-3 if family == "attention" else 1e-2


def cell_plan(families: list[str]) -> list[tuple[str, int, int, int]]:
    """(family, seq_len, kv_pairs, d_model) for every cell, in the order they run."""
    kv_pairs = dict(SWEEP)
    return [(family, seq_len, kv_pairs[seq_len], d_model)
            for seq_len, d_model in PRIORITY for family in families]


def answer_logits(model: ZooForCausalLM, ids: torch.Tensor,
                  labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits at the answer positions (N, vocab), their targets (N,)).

    The head runs only where a label is: the loss and accuracy look nowhere else, and the
    vocabulary-wide projection of every position would be most of a step's cost.
    """
    hidden = model.model(ids)[0][:, :-1]
    targets = labels[:, 1:]
    answered = targets != IGNORE
    return model.lm_head(hidden[answered]).float(), targets[answered]


@torch.no_grad()
def accuracy(model: ZooForCausalLM, ids: torch.Tensor, labels: torch.Tensor,
             batch_size: int) -> float:
    """Fraction of answer positions whose argmax is the recalled value."""
    model.eval()
    correct = total = 0
    for start in range(0, len(ids), batch_size):
        logits, targets = answer_logits(model, ids[start:start + batch_size],
                                        labels[start:start + batch_size])
        correct += int((logits.argmax(-1) == targets).sum())
        total += targets.numel()
    model.train()
    return correct / max(1, total)


def held_out(task: MQAR, recipe: Recipe) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """(stop set, test set): disjoint held-out streams, neither seen in training."""
    stop = task.val_batch(np.arange(max(1, recipe.stop_tokens // task.seq_len)))
    first_test = 1 << 20  # far past the stop set's indices
    test = task.val_batch(np.arange(first_test, first_test + max(1, recipe.test_tokens
                                                                      // task.seq_len)))
    return stop, test


def state_bytes(model: ZooForCausalLM, seq_len: int) -> int:
    """Bytes of recurrent state (or KV cache) per sequence after seq_len tokens, all layers."""
    return sum(int(block.mixer.state_size(seq_len)) for block in model.model.layers)


def lr_factor(step: int, recipe: Recipe) -> float:
    """Linear warm-up, then a cosine to 0 at the step budget, as zoology's cosine over its
    epochs: a cell that stops early (solved, or out of time) has trained near the peak rate."""
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / recipe.steps)))


def train_cell(family: str, seq_len: int, kv_pairs: int, d_model: int, recipe: Recipe, *,
               device: str = "cpu", seed: int = 0) -> dict:
    """Train one (family, length, width) cell from scratch; its row of the results."""
    from zoo.train.config import OptimSection
    from zoo.train.loop import build_optimizer

    task = MQAR(VOCAB_SIZE, seq_len, seed, kv_pairs, query_gap_power=QUERY_GAP_POWER)
    (stop_ids, stop_labels), (test_ids, test_labels) = (
        (ids.to(device), labels.to(device)) for ids, labels in held_out(task, recipe))
    torch.manual_seed(seed)
    model = ZooForCausalLM(model_config(family, d_model, seq_len)).to(device).train()
    lr, batch_size = learning_rate(family), recipe.batch_size(seq_len)
    optimizer = build_optimizer(model.parameters(), OptimSection(
        lr=lr, weight_decay=recipe.weight_decay))
    step, stop_accuracy, reason, loss = 0, 0.0, "steps", float("nan")
    start = time.perf_counter()
    while step < recipe.steps:
        if time.perf_counter() - start > recipe.cell_s:
            reason = "time"
            break
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(step, recipe)
        positions = np.arange(step * batch_size, (step + 1) * batch_size)
        ids, labels = (t.to(device) for t in task.train_batch(positions))
        logits, targets = answer_logits(model, ids, labels)
        batch_loss = F.cross_entropy(logits, targets)
        batch_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss, step = float(batch_loss.detach()), step + 1
        if step % recipe.eval_interval == 0:
            stop_accuracy = accuracy(model, stop_ids, stop_labels, 2 * batch_size)
            if stop_accuracy >= SOLVED:
                reason = "solved"
                break
    train_s = time.perf_counter() - start
    return {
        "family": family, "seq_len": seq_len, "kv_pairs": kv_pairs, "d_model": d_model,
        "accuracy": accuracy(model, test_ids, test_labels, 2 * batch_size),
        "stop_accuracy": stop_accuracy, "steps": step, "stopped": reason, "train_loss": loss,
        "lr": lr, "batch_size": batch_size, "train_s": train_s,
        "params": sum(p.numel() for p in model.parameters()),
        "state_bytes": state_bytes(model, seq_len),
    }


def run_mqar(options: BenchOptions) -> list[dict]:
    """Every cell of the sweep that the budget allows, in PRIORITY order; the others as rows
    with stopped "not run". A budget above Recipe.cell_s per cell trains every cell longer;
    `--quick`: two cells of a few steps (what the test suite runs)."""
    torch.set_num_threads(os.cpu_count() or 1)
    chosen = only_families(options, FAMILIES)
    plan = cell_plan([f for f in available_families() if f in chosen])
    if options.quick:  # the two cheapest cells of the first families
        recipe = QUICK
        plan = [(family, seq_len, kv, d_model) for family, seq_len, kv, d_model in plan
                if (seq_len, d_model) == (SWEEP[0][0], D_MODELS[0])][:2]
    else:
        share = TRAIN_SHARE * options.budget_s / len(plan)
        recipe = dataclasses.replace(Recipe(), cell_s=max(Recipe.cell_s, share))
    start, rows = time.perf_counter(), []
    for index, (family, seq_len, kv_pairs, d_model) in enumerate(plan, 1):
        # a cell starts only if its whole training time fits in what the budget has left
        if time.perf_counter() - start + recipe.cell_s > options.budget_s:
            rows.append({"family": family, "seq_len": seq_len, "kv_pairs": kv_pairs,
                         "d_model": d_model, "accuracy": None, "stopped": "not run"})
            continue
        row = train_cell(family, seq_len, kv_pairs, d_model, recipe, device=options.device)
        rows.append(row)
        print(f"[mqar {index}/{len(plan)}] {family:16s} T={seq_len:3d} kv={kv_pairs:2d} "
              f"d={d_model:3d}: accuracy {row['accuracy']:.3f} after {row['steps']} steps "
              f"({row['stopped']}, {row['train_s']:.1f} s); "
              f"{time.perf_counter() - start:.0f}/{options.budget_s:.0f} s",
              file=sys.stderr, flush=True)
    return rows


def mqar_report(rows: list[dict]) -> str:
    """Markdown: accuracy per family x d_model, one table per sequence length; the cells not
    run; the measured ordering beside zoology's."""
    families = list(dict.fromkeys(r["family"] for r in rows))
    widths = sorted({r["d_model"] for r in rows})
    cell = {(r["family"], r["seq_len"], r["d_model"]): r for r in rows}
    done = [r for r in rows if r.get("accuracy") is not None]
    seconds = sorted({round(r["train_s"]) for r in done})
    lines = [
        f"MQAR accuracy on held-out sequences (at the answer positions): {N_LAYERS} layers, no "
        f"FFN, vocabulary {VOCAB_SIZE}, " + (f"up to {seconds[-1]} s of training per cell. "
                                             if seconds else "")
        + "Each cell: accuracy (steps trained); `*` the cell's training time ran out before "
        "its step budget or a solve, `-` not run. State: bytes per sequence at d_model "
        f"{widths[0]} -> {widths[-1]}.",
    ]
    for seq_len, kv_pairs in SWEEP:
        if not any(r["seq_len"] == seq_len for r in rows):
            continue
        lines += ["", f"Sequence length {seq_len}, {kv_pairs} key-value pairs:", "",
                  "| family | " + " | ".join(f"d_model {d}" for d in widths) + " | state KiB |",
                  "|---|" + "---|" * (len(widths) + 1)]
        for family in families:
            texts, states = [], []
            for d_model in widths:
                r = cell.get((family, seq_len, d_model))
                if r is None or r.get("accuracy") is None:
                    texts.append("-")
                    continue
                texts.append(f"{r['accuracy']:.3f} ({r['steps']})"
                             + ("*" if r["stopped"] == "time" else ""))
                states.append(f"{r['state_bytes'] / 1024:.0f}")
            lines.append(f"| {family} | " + " | ".join(texts) + " | "
                         + (" -> ".join(states) or "-") + " |")
    missing = [r for r in rows if r.get("accuracy") is None]
    if missing:
        lines += ["", f"Not run within the budget ({len(missing)} cells): " + "; ".join(
            f"{r['family']} T={r['seq_len']} d={r['d_model']}" for r in missing) + "."]
    lines += ["", "Beside zoology's findings:", ""] + [f"- {line}" for line in comparisons(rows)]
    return "\n".join(lines)


def comparisons(rows: list[dict]) -> list[str]:
    """Zoology's three claims, each checked against the measured cells (where they ran)."""
    done = [r for r in rows if r.get("accuracy") is not None]

    def acc(family, seq_len=None, d_model=None):
        return [r["accuracy"] for r in done if r["family"] == family
                and seq_len in (None, r["seq_len"]) and d_model in (None, r["d_model"])]

    out = []
    attention = acc("attention")
    if attention:
        solved = sum(a >= SOLVED for a in attention)
        out.append(f"zoology: attention solves every cell. Measured: {solved} of "
                   f"{len(attention)} cells at >= {SOLVED} (lowest {min(attention):.3f}): "
                   + ("agrees." if solved == len(attention) else "differs."))
    hyena = {(r["seq_len"], r["d_model"]): r["accuracy"] for r in done if r["family"] == "hyena"}
    if hyena:
        grows = [f"T={t}: " + " -> ".join(f"{hyena[t, d]:.2f}" for d in D_MODELS if (t, d) in hyena)
                 for t, _ in SWEEP if sum((t, d) in hyena for d in D_MODELS) > 1]
        out.append("zoology: gated convolutions (Hyena) need d_model to grow with the sequence "
                   "length. Measured Hyena accuracy as d_model grows, " + ("; ".join(grows)
                                                                           or "one width only")
                   + ".")
    pairs = []
    for r in done:
        if r["family"] != "linear_attention":
            continue
        for delta in ("deltanet", "gated_deltanet"):
            other = next((o for o in done if o["family"] == delta and o["seq_len"] == r["seq_len"]
                          and o["d_model"] == r["d_model"]), None)
            if other is not None:
                pairs.append((other["accuracy"] - r["accuracy"], other["state_bytes"]
                              / max(1, r["state_bytes"])))
    if pairs:
        better = sum(gap > 0 for gap, _ in pairs)
        ratios = sorted(ratio for _, ratio in pairs)
        out.append(
            "zoology (and the delta-rule papers): delta-rule models recall far better than plain "
            f"linear attention at equal state size. Measured: DeltaNet / Gated DeltaNet beat "
            f"linear attention in {better} of {len(pairs)} (family, cell) pairs, by "
            f"{sum(g for g, _ in pairs) / len(pairs):+.3f} accuracy on average, with "
            f"{ratios[0]:.2f}-{ratios[-1]:.2f}x its state bytes: "
            + ("agrees." if better == len(pairs) else f"differs in {len(pairs) - better}."))
    means = {}
    for family in dict.fromkeys(r["family"] for r in done):
        means[family] = sum(acc(family)) / len(acc(family))
    if means:
        ranked = sorted(means, key=means.get, reverse=True)
        out.append("Measured ordering by mean accuracy over the cells run: "
                   + " > ".join(f"{f} ({means[f]:.2f})" for f in ranked) + ".")
    return out


def mqar_plot(rows: list[dict], path: Path) -> None:
    """Accuracy vs d_model, one panel per sequence length, one line per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.get("accuracy") is not None]
    lengths = [(t, k) for t, k in SWEEP if any(r["seq_len"] == t for r in done)]
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 4.0), sharey=True,
                             squeeze=False)
    for ax, (seq_len, kv_pairs) in zip(axes[0], lengths):
        for family in dict.fromkeys(r["family"] for r in done):
            points = sorted((r["d_model"], r["accuracy"]) for r in done
                            if r["family"] == family and r["seq_len"] == seq_len)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=family)
        ax.set_xscale("log", base=2)
        ax.set_xlim(D_MODELS[0] / 1.25, D_MODELS[-1] * 1.25)
        ax.set_xticks(D_MODELS, [str(d) for d in D_MODELS])
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("d_model")
        ax.set_title(f"seq_len {seq_len}, {kv_pairs} kv pairs")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("MQAR accuracy (held out)")
    axes[0][-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"MQAR as zoology's figure 2: {N_LAYERS} layers, no FFN, vocabulary {VOCAB_SIZE}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the legend sits outside the panels
    plt.close(fig)


register_bench(
    "mqar",
    "multi-query associative recall (zoology figure 2): accuracy vs d_model per family and length",
    plot=mqar_plot,
    report=mqar_report,
    families=FAMILIES,
)(run_mqar)
