"""`zoo bench state-quant`: how much the bounded mixers' states tolerate bfloat16 and int8.

For every bounded family (the tiny configs, the -small configs and the 130M-scale shapes, all
with random weights in float32), the float run decodes greedily for STEPS tokens after a random
prompt; the bfloat16 and int8 runs are fed the same tokens with their states stored between
steps (zoo.infer.state_quant) and give, per step, the logits' relative error
||logits - float logits|| / ||float logits||. The first step where a run's greedy token differs
from the float run's is where free-running greedy decoding would first diverge. Each family is
measured with its recurrent sums stored ("sums": STORED_FIELDS, conv windows, token shifts,
LoLCATs' window and RWKV-4's triple kept float) and, where something is kept float, with every
float field stored ("everything"): what those exceptions are worth. The policy
(state_quant.NOT_TOLERATED) keeps a family float under a format where "sums" is past
TOLERATED_ERROR; its bytes are the policy's column. Random weights give near-flat logits
(margins between the top tokens are small), so divergence steps here are a pessimistic
reading; the relative error is the figure that carries over.
"""

from __future__ import annotations

import sys
import time

import torch

from zoo.app.bench.harness import BenchOptions, only_families, register_bench
from zoo.config import load_config
from zoo.infer.prefill import prefill
from zoo.infer.state_quant import (
    KEPT_FLOAT,
    NOT_TOLERATED,
    STATE_DTYPES,
    STORED_FIELDS,
    TOLERATED_ERROR,
    restore_cache,
    store_cache,
    stored_nbytes,
)
from zoo.infer.step import decode_step, flushing_denormals
from zoo.model import ZooForCausalLM

STEPS = 256
PROMPT_TOKENS = 16
_WINDOW_LINEAR = {"type": "window_linear_attention", "n_heads": 4, "window": 16}
# family -> [(size, config name, overrides)]
MODELS: dict[str, list[tuple[str, str, dict]]] = {
    "linear_attention": [("tiny", "linear-attention-tiny", {}),
                         ("small", "linear-attention-small", {})],
    "retnet": [("tiny", "retnet-tiny", {}), ("small", "retnet-small", {})],
    "window_linear_attention": [("tiny", "linear-attention-tiny", {"mixer": _WINDOW_LINEAR})],
    "linformer": [("tiny", "linformer-tiny", {}), ("small", "linformer-small", {})],
    "mamba": [("tiny", "mamba-tiny", {}), ("130m", "mamba-130m", {})],
    "mamba2": [("tiny", "mamba2-tiny", {}), ("130m", "mamba2-130m", {})],
    "rwkv4": [("tiny", "rwkv4-tiny", {}), ("169m", "rwkv4-169m", {})],
    "rwkv6": [("tiny", "rwkv6-tiny", {}), ("small", "rwkv6-small", {})],
    "rwkv7": [("tiny", "rwkv7-tiny", {}), ("small", "rwkv7-small", {})],
    "deltanet": [("tiny", "deltanet-tiny", {}), ("small", "deltanet-small", {})],
    "gated_deltanet": [("tiny", "gated-deltanet-tiny", {}),
                       ("small", "gated-deltanet-small", {})],
    "kda": [("tiny", "kda-tiny", {}), ("small", "kda-small", {})],
    "gated_deltanet_hybrid": [("tiny", "gated-deltanet-hybrid-tiny", {})],
    "kimi_linear": [("tiny", "kimi-linear-tiny", {})],
}
FAMILIES = tuple(MODELS)
# every float field stored: what the policy's float exceptions (KEPT_FLOAT) are worth
EVERYTHING_STORED = {
    cls: tuple(dict.fromkeys(STORED_FIELDS.get(cls, ()) + tuple(KEPT_FLOAT.get(cls, {}))))
    for cls in {**STORED_FIELDS, **KEPT_FLOAT}
}


def logits_run(model: ZooForCausalLM, prompt: list[int], feed: list[int] | None,
               state_dtype: str | None, policy: dict | None, steps: int) -> torch.Tensor:
    """(steps + 1, V) logits: the prefill's, then one per decode step fed `feed` (greedy from
    its own logits when None), the states stored as `state_dtype` between steps."""
    start = prefill(model, [prompt])
    cache, logits = start.cache, [start.logits[0]]
    if state_dtype is not None:
        store_cache(cache, state_dtype, policy)
    for step in range(steps):
        token = int(logits[-1].argmax()) if feed is None else feed[step]
        if state_dtype is not None:
            restore_cache(cache)
        out = decode_step(model, torch.tensor([[token]]), cache)
        if state_dtype is not None:
            store_cache(cache, state_dtype, policy)
        logits.append(out[0])
    return torch.stack(logits)


def measure_model(family: str, size: str, config_name: str, overrides: dict,
                  steps: int) -> list[dict]:
    config = load_config(config_name, **overrides)
    torch.manual_seed(0)
    model = ZooForCausalLM(config).eval()
    prompt = torch.randint(0, config.vocab_size, (PROMPT_TOKENS,)).tolist()
    rows = []
    with torch.no_grad(), flushing_denormals():
        reference = logits_run(model, prompt, None, None, None, steps)
        greedy = reference.argmax(-1).tolist()
        float_bytes = stored_nbytes(prefill(model, [prompt]).cache, None)
        kinds = {type(state) for layer in prefill(model, [prompt]).cache.layers if layer
                 for state in layer if state is not None}
        variants = [("sums", STORED_FIELDS)]
        if any(issubclass(kind, cls) for kind in kinds for cls in KEPT_FLOAT):
            variants.append(("everything", EVERYTHING_STORED))
        for stored, policy in variants:
            for state_dtype in STATE_DTYPES:
                began = time.perf_counter()
                run = logits_run(model, prompt, greedy, state_dtype, policy, steps)
                error = ((run - reference).norm(dim=-1) / reference.norm(dim=-1)).tolist()
                differs = [i for i, (a, b) in enumerate(zip(run.argmax(-1).tolist(), greedy))
                           if a != b]
                cache = prefill(model, [prompt]).cache
                policy_bytes = stored_nbytes(cache, state_dtype)
                store_cache(cache, state_dtype, policy)
                refused = sorted({reason for kind in kinds
                                  for cls, reason in NOT_TOLERATED[state_dtype].items()
                                  if issubclass(kind, cls)})
                rows.append({
                    "family": family, "size": size, "config": config_name,
                    "d_model": config.d_model, "n_layers": config.n_layers,
                    "state_dtype": state_dtype, "stored": stored, "steps": steps,
                    "float_state_bytes": float_bytes, "stored_state_bytes": cache.nbytes(),
                    "policy_state_bytes": policy_bytes,
                    "rel_error_last": error[-1], "rel_error_max": max(error),
                    "first_divergence": differs[0] if differs else None,
                    "policy_keeps_float": "; ".join(refused) or None,
                    "seconds": time.perf_counter() - began,
                })
                row = rows[-1]
                print(f"[state-quant] {family:24s} {size:6s} {state_dtype:8s} {stored:10s} "
                      f"err {row['rel_error_last']:.2e} (max {row['rel_error_max']:.2e}) "
                      f"diverges at {row['first_divergence']}", file=sys.stderr, flush=True)
    return rows


def run_state_quant(options: BenchOptions) -> list[dict]:
    """Every chosen family's models; `--quick`: two tiny families, 16 steps."""
    families = only_families(options, FAMILIES)
    steps = STEPS
    if options.quick:
        families, steps = families[:2], 16
    rows, start = [], time.perf_counter()
    for family in families:
        for size, config_name, overrides in MODELS[family]:
            if options.quick and size != "tiny":
                continue
            if time.perf_counter() - start > options.budget_s:
                rows.append({"family": family, "size": size, "config": config_name,
                             "stopped": "not run: budget"})
                continue
            rows += measure_model(family, size, config_name, overrides, steps)
    return rows


def tolerance_summary(rows: list[dict]) -> list[str]:
    """Per family and format: the worst max error of its recurrent sums over the sizes run,
    whether that is within TOLERATED_ERROR, and what the policy does (they should agree)."""
    worst: dict[tuple[str, str], float] = {}
    policy: dict[tuple[str, str], str] = {}
    measured = [row for row in rows if "stopped" not in row]
    # a family whose sums are all KEPT_FLOAT (RWKV-4) is judged on everything stored
    stores_nothing = {row["family"] for row in measured if row["stored"] == "sums"
                      and row["stored_state_bytes"] == row["float_state_bytes"]}
    for row in measured:
        if (row["stored"] == "sums") == (row["family"] in stores_nothing):
            continue
        key = (row["family"], row["state_dtype"])
        worst[key] = max(worst.get(key, 0.0), row["rel_error_max"])
        policy[key] = ("float (kept)" if row["stored"] == "everything"
                       else "float" if row["policy_keeps_float"] else "stored")
    lines = [f"Tolerated: the recurrent sums' logits error stays within {TOLERATED_ERROR:g} "
             "(max over 256 steps, worst size).\n",
             "| family | " + " | ".join(f"{d}: worst error, policy" for d in STATE_DTYPES) + " |",
             "|---|" + "---|" * len(STATE_DTYPES)]
    for family in dict.fromkeys(f for f, _ in worst):
        cells = []
        for state_dtype in STATE_DTYPES:
            error = worst.get((family, state_dtype))
            cells.append("" if error is None else
                         f"{error:.1e} {'ok' if error <= TOLERATED_ERROR else 'too large'}, "
                         f"{policy[family, state_dtype]}")
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    return lines + [""]


def state_quant_report(rows: list[dict]) -> str:
    lines = tolerance_summary(rows) + [
        "Logits' relative error after the last decode step (and its maximum over the steps) "
        "against the float32 state, fed the float run's greedy tokens; the first step whose "
        "greedy token differs (none: the same tokens throughout). Random weights, float32 "
        "model; state bytes per sequence.\n",
        "| family | size | state | stored | bytes float -> stored | rel. error last (max) "
        "| first divergence | policy: bytes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "stopped" in row:
            lines.append(f"| {row['family']} | {row['size']} | {row['stopped']} | | | | | |")
            continue
        divergence = row["first_divergence"]
        lines.append(
            f"| {row['family']} | {row['size']} | {row['state_dtype']} | {row['stored']} | "
            f"{row['float_state_bytes']:,} -> {row['stored_state_bytes']:,} | "
            f"{row['rel_error_last']:.1e} ({row['rel_error_max']:.1e}) | "
            f"{'none in ' + str(row['steps']) if divergence is None else divergence} | "
            f"{row['policy_state_bytes']:,}"
            f"{' (float)' if row['policy_keeps_float'] else ''} |")
    reasons = sorted({row["policy_keeps_float"] for row in rows if row.get("policy_keeps_float")})
    lines += ["", "Kept float by the policy, and why:", ""] + [f"- {reason}" for reason in reasons]
    return "\n".join(lines)


register_bench(
    "state-quant",
    "bounded states stored in bfloat16 / int8 between decode steps: logits error and greedy "
    "divergence per family",
    report=state_quant_report,
    families=FAMILIES,
)(run_state_quant)
