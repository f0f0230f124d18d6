"""`zoo bench serve`: `zoo serve` under 1, 4, 16 and 64 concurrent streaming clients.

Each model is served by a real `zoo serve` subprocess; clients in this process stream
/v1/completions (token-id prompts of mixed lengths, mixed output lengths, `ignore_eos` so every
request generates the tokens it asked for) and record, per request, the time to its first token
and the time per output token after it. A level's tokens/s is every output token over the wall
time from the first request sent to the last token received. While a level runs, /health is
read every POLL_S seconds: the engine's KV bytes in use and bounded-state bytes, divided by the
sequences active, give the memory per active sequence (its maximum over the level), and its
timing totals at the level's start and end give the server's own account: mean engine step ms,
mean ms from a step's end to its chunk's write, event-loop CPU ms per chunk.

Beside it, with the server stopped, transformers' batched `generate` on the same prompts: waves
of `clients` prompts, left-padded, each wave generating its longest output (greedy, no EOS);
only the tokens each prompt asked for count.

Models: the real SmolLM2-135M and a bounded model of the same size (mamba2-130m's shape with
SmolLM2's vocabulary and tokenizer, random weights: speed and memory do not depend on them).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from zoo.app.bench.harness import BenchOptions, format_rows, only_families, register_bench

LEVELS = (1, 4, 16, 64)
QUICK_LEVELS = (1, 2)
PROMPT_TOKENS = (16, 128)  # each prompt's length, uniform in this range
OUTPUT_TOKENS = (16, 96)  # each request's max_tokens
MIN_REQUESTS = 8  # a level sends max(clients, MIN_REQUESTS) requests
POLL_S = 0.25
DTYPE = "bfloat16"
MAX_BATCH = 16  # zoo serve's default: 64 clients queue for 16 slots
FAMILIES = ("smollm2-135m", "mamba2-130m")
START_TIMEOUT_S = 300.0


@dataclasses.dataclass
class Timing:
    """One request as its client saw it."""

    sent: float
    first: float | None = None
    last: float | None = None
    tokens: int = 0

    def ms_per_output_token(self) -> float | None:
        if self.first is None or self.tokens < 2:
            return None
        return 1e3 * (self.last - self.first) / (self.tokens - 1)


def workload(n_requests: int, vocab_size: int, seed: int,
             prompt_tokens: tuple[int, int] = PROMPT_TOKENS,
             output_tokens: tuple[int, int] = OUTPUT_TOKENS) -> list[tuple[list[int], int]]:
    """(prompt ids, max_tokens) for each request: lengths uniform in their ranges, ids uniform
    over the vocabulary, the same for every model and for transformers."""
    g = torch.Generator().manual_seed(seed)
    requests = []
    for _ in range(n_requests):
        length = int(torch.randint(prompt_tokens[0], prompt_tokens[1] + 1, (), generator=g))
        out = int(torch.randint(output_tokens[0], output_tokens[1] + 1, (), generator=g))
        requests.append((torch.randint(0, vocab_size, (length,), generator=g).tolist(), out))
    return requests


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`zoo serve MODEL` in a subprocess, stopped on exit (also on an error in the block)."""

    def __init__(self, model: str, max_batch: int, dtype: str, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "zoo.app", "serve", model, "--port",
                        str(self.port), "--max-batch", str(max_batch), "--dtype", dtype]
        self.log = log

    def __enter__(self) -> Server:
        import httpx

        self._log_file = open(self.log, "w")
        self.process = subprocess.Popen(self.command, stdout=self._log_file,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"zoo serve exited with {self.process.returncode}: "
                                   f"{self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise TimeoutError(f"zoo serve did not answer /health in {START_TIMEOUT_S:.0f} s")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log_file.close()

    def health(self) -> dict:
        import httpx

        return httpx.get(f"{self.url}/health", timeout=10).json()


async def _stream_one(client, url: str, model: str, prompt: list[int], max_tokens: int
                      ) -> Timing:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    timing = Timing(sent=time.perf_counter())
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"zoo serve answered {response.status_code}: "
                               f"{(await response.aread()).decode()[:500]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            now = time.perf_counter()
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                timing.first = timing.first if timing.first is not None else now
                timing.last = now
            if chunk.get("usage"):
                timing.tokens = chunk["usage"]["completion_tokens"]
    return timing


async def _run_level(server: Server, model: str, requests: list[tuple[list[int], int]],
                     clients: int) -> tuple[list[Timing], float, list[dict]]:
    """Every request streamed by `clients` concurrent clients, each taking the next request
    when its last one ends; (timings, wall seconds, /health samples)."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    timings: list[Timing] = []
    samples: list[dict] = []
    done = asyncio.Event()

    async def client_loop(client):
        while not queue.empty():
            prompt, max_tokens = queue.get_nowait()
            timings.append(await _stream_one(client, server.url, model, prompt, max_tokens))

    async def poll(client):
        while not done.is_set():
            samples.append((await client.get(f"{server.url}/health")).json())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), POLL_S)

    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        # the readings before the first request and after the last bound the level's timing
        samples.append((await client.get(f"{server.url}/health")).json())
        poller = asyncio.create_task(poll(client))
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - start
        done.set()
        await poller
        samples.append((await client.get(f"{server.url}/health")).json())
    return timings, wall, samples


def server_timing(samples: list[dict]) -> dict:
    """The server's own account of a level, from its first and last /health readings: mean
    engine step ms, mean ms from a step's end to its chunk's write, and the event loop's CPU ms
    per chunk written (what serving a token costs beside the step)."""
    timed = [health["timing"] for health in samples if "timing" in health]
    if len(timed) < 2:
        return {"server_step_ms": None, "step_to_write_ms": None, "loop_cpu_ms_per_chunk": None}
    first, last = timed[0], timed[-1]
    steps, chunks = last["steps"] - first["steps"], last["chunks"] - first["chunks"]
    loop_cpu_s = last["cpu_s"]["event_loop"] - first["cpu_s"]["event_loop"]
    return {
        "server_step_ms": (last["step_ms_total"] - first["step_ms_total"]) / steps
        if steps else None,
        "step_to_write_ms": (last["step_to_write_ms_total"] - first["step_to_write_ms_total"])
        / chunks if chunks else None,
        "loop_cpu_ms_per_chunk": 1e3 * loop_cpu_s / chunks if chunks else None,
    }


def memory_per_sequence(samples: list[dict]) -> float | None:
    """The most bytes one active sequence held at any /health sample: KV bytes in use shared
    over the active sequences, plus one sequence's bounded state."""
    per_sequence = []
    for health in samples:
        stats = health.get("engine", health)
        active = stats.get("active", 0)
        if active:
            per_sequence.append(stats.get("kv_bytes_in_use", 0) / active
                                + stats.get("state_bytes_per_sequence", 0))
    return max(per_sequence) if per_sequence else None


def level_row(family: str, clients: int, timings: list[Timing], wall: float,
              samples: list[dict]) -> dict:
    ttft = [1e3 * (t.first - t.sent) for t in timings if t.first is not None]
    tpot = [ms for t in timings if (ms := t.ms_per_output_token()) is not None]
    tokens = sum(t.tokens for t in timings)
    memory = memory_per_sequence(samples)
    return {
        "model": family, "server": "zoo serve", "clients": clients, "requests": len(timings),
        "output_tokens": tokens, "tokens_per_s": tokens / wall,
        "ttft_p50_ms": percentile(ttft, 0.5), "ttft_p99_ms": percentile(ttft, 0.99),
        "ms_per_token_p50": percentile(tpot, 0.5), "ms_per_token_p99": percentile(tpot, 0.99),
        "MB_per_active_sequence": memory / 1e6 if memory is not None else None,
        **server_timing(samples),
    }


@torch.inference_mode()
def transformers_row(family: str, hf_model, requests: list[tuple[list[int], int]],
                     clients: int, pad_id: int) -> dict:
    """transformers' generate on the same requests, `clients` at a time, left-padded."""
    start = time.perf_counter()
    tokens = 0
    for first in range(0, len(requests), clients):
        wave = requests[first:first + clients]
        width = max(len(prompt) for prompt, _ in wave)
        ids = torch.full((len(wave), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (prompt, _) in enumerate(wave):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        longest = max(out for _, out in wave)
        hf_model.generate(ids, attention_mask=mask, max_new_tokens=longest,
                          min_new_tokens=longest, do_sample=False, pad_token_id=pad_id,
                          eos_token_id=None)
        tokens += sum(out for _, out in wave)
    wall = time.perf_counter() - start
    return {"model": family, "server": "transformers generate (batched)", "clients": clients,
            "requests": len(requests), "output_tokens": tokens, "tokens_per_s": tokens / wall}


def _bounded_model_dir(folder: Path, dtype: torch.dtype) -> tuple[str, object]:
    """mamba2-130m's shape with SmolLM2's vocabulary, random weights and SmolLM2's tokenizer,
    saved to `folder`; (its path, the transformers model of the same shape)."""
    from zoo.app.bench.decode import transformers_peer
    from zoo.config import load_config
    from zoo.hf_import import from_hf
    from zoo.model import ZooForCausalLM

    tokenizer = from_hf("smollm2-135m").tokenizer
    config = load_config("mamba2-130m", vocab_size=len(tokenizer))
    torch.manual_seed(0)
    ZooForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    peer = transformers_peer(config)
    return str(folder), peer[1].to(dtype).eval() if peer is not None else None


def _smollm2_peer(dtype: torch.dtype):
    from zoo.hf_import import load_hf_model, smollm2_path

    hf_model, _ = load_hf_model(str(smollm2_path()), dtype)
    return hf_model.eval()


def serve_report(rows: list[dict]) -> str:
    lines = [format_rows(rows), ""]
    for family in dict.fromkeys(r["model"] for r in rows):
        served = {r["clients"]: r for r in rows
                  if r["model"] == family and r["server"] == "zoo serve"}
        if 1 in served and served:
            top = max(served)
            lines.append(
                f"{family}: {served[top]['tokens_per_s']:.1f} tokens/s at {top} clients, "
                f"x{served[top]['tokens_per_s'] / served[1]['tokens_per_s']:.1f} one stream's "
                f"{served[1]['tokens_per_s']:.1f}" + (
                    f"; at 16 clients x{served[16]['tokens_per_s'] / served[1]['tokens_per_s']:.1f}"
                    " (target x8 for SmolLM2)" if 16 in served else ""))
        memory = [(c, r["MB_per_active_sequence"]) for c, r in sorted(served.items())
                  if r.get("MB_per_active_sequence") is not None]
        if memory:
            lines.append(f"{family}: MB per active sequence "
                         + ", ".join(f"{m:.2f} at {c} clients" for c, m in memory))
    return "\n".join(lines)


def _serve_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (family, server) in dict.fromkeys((r["model"], r["server"]) for r in rows):
        mine = sorted((r for r in rows if r["model"] == family and r["server"] == server),
                      key=lambda r: r["clients"])
        style = "-o" if server == "zoo serve" else "--s"
        left.plot([r["clients"] for r in mine], [r["tokens_per_s"] for r in mine], style,
                  label=f"{family}, {server}")
        memory = [(r["clients"], r["MB_per_active_sequence"]) for r in mine
                  if r.get("MB_per_active_sequence") is not None]
        if memory:
            right.plot(*zip(*memory), "-o", label=family)
    left.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="output tokens/s",
             title="Throughput")
    right.set(xscale="log", xlabel="concurrent clients", ylabel="MB per active sequence",
              title="Memory per active sequence (KV + state)")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@register_bench(
    "serve",
    "zoo serve under 1-64 concurrent streaming clients: tokens/s, time to first token, ms per "
    "output token (p50/p99), memory per active sequence; transformers' batched generate beside",
    plot=_serve_plot, report=serve_report, families=FAMILIES,
)
def bench_serve(options: BenchOptions) -> list[dict]:
    if options.device != "cpu":
        raise ValueError("zoo bench serve runs on the CPU (the server's --device is cpu here)")
    levels = QUICK_LEVELS if options.quick else LEVELS
    dtype = getattr(torch, DTYPE)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        families = only_families(options, FAMILIES)
        # --quick (the test suite): one tiny bounded model, no transformers peer
        for family in families[:1] if options.quick else families:
            if options.quick:
                family = model = "mamba2-tiny"
                peer, vocab = None, 256
            elif family == "smollm2-135m":
                model, peer, vocab = family, _smollm2_peer(dtype), 49152
            else:
                model, peer = _bounded_model_dir(scratch / family, dtype)
                vocab = 49152
            prompt_range = (4, 12) if options.quick else PROMPT_TOKENS
            output_range = (4, 8) if options.quick else OUTPUT_TOKENS
            plans = {c: workload(max(c, 2 if options.quick else MIN_REQUESTS), vocab, seed=c,
                                 prompt_tokens=prompt_range, output_tokens=output_range)
                     for c in levels}
            with Server(model, MAX_BATCH, DTYPE, scratch / f"{family}.log") as server:
                name = server.health().get("model") or model
                # the first requests pay for lazy set-up (kernel builds, first allocations)
                asyncio.run(_run_level(server, name, plans[levels[0]][:2], 1))
                for clients in levels:
                    timings, wall, samples = asyncio.run(
                        _run_level(server, name, plans[clients], clients))
                    rows.append(level_row(family, clients, timings, wall, samples))
                    print(f"[serve] {family} {clients} clients: "
                          f"{rows[-1]['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
            if peer is not None:
                for clients in levels:
                    rows.append(transformers_row(family, peer, plans[clients], clients, pad_id=0))
                    print(f"[serve] {family} transformers {clients}: "
                          f"{rows[-1]['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
                del peer
    return rows
