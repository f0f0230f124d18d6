"""`zoo bench compress`: compressed weights against their float originals, against llama.cpp, and
zoo's integer kernels against torch's and torchao's own.

    zoo bench compress            SmolLM2-135M in fp32, bf16, int8, int4 g32 (RTN and GPTQ), the
                                  GGUF file's own Q4_1 and a Q8_0 file written from it (kept
                                  quantised), Wanda 2:4 and SparseGPT 2:4; llama.cpp on the
                                  same GGUF files; int8 and int4 g32 on torch's aten kernels
                                  and torchao's; every tiny config in int8 and int4
    zoo bench compress --quick    attention-tiny in fp32, int8 and int4 at 128 context, eager
                                  (torch aten and torchao rows eager too)

Per SmolLM2 variant: held-out perplexity (the same consecutive windows of the default corpus's
held-out split for every variant, as `zoo compress --eval-tokens` takes them; float32
activations, so the figure is the weights' alone), weight bytes and bytes per weight, and decode
ms/token at 128 and 2k context with bf16 activations (`generate(compile=True)`'s step: the
native C++ step where it reads the format, torch.compile's otherwise), beside the read bound:
the bytes a step reads (`decode_read_bytes` plus the KV cache) at the read bandwidth measured
just before each run, as `zoo bench decode-smollm2` pairs them. Every figure's runs are
interleaved with every other's (llama.cpp's included), so a slow spell of the shared machine
lands on all of them alike.

llama.cpp runs through llama-cpp-python (the optional `bench-llamacpp` extra, built from source)
with as many threads as torch uses: ms/token as the wall clock of single-token evals after a
real prefill, and perplexity from its logits on the same token ids. Without the package its
rows are one `skipped` row naming why.

Beside zoo's own step, the same int8 and int4 g32 RTN models run on torch's weight-only kernels
(engine "torch aten": QuantizedLinear's eager forward calls `aten._weight_int8pack_mm` and
`aten._weight_int4pack_mm_for_cpu`; steps "eager" and "inductor", the latter
`generate(compile="inductor")`), and zoo's float model with torchao's weight-only quantisation
applied to the same linear layers (engine "torchao", the optional `bench-torchao` extra:
`Int8WeightOnlyConfig`, per output channel, and on the CPU `PrototypeInt4WeightOnlyConfig`, groups
of 32, whose Int4OpaqueTensor runs the same aten int4 kernel; torchao 0.18's
`Int4WeightOnlyConfig` layouts need CUDA kernels). torchao quantises each model in its own dtype:
its perplexity is a float32 model's, its decode figure a bf16 model's, quantised from bf16 weights
(its tensors do not follow `.to(dtype)`). The native C++ step is never given a torchao model: it
would read the subclass weights as float.

The tiny configs have random weights: their perplexity sits near the vocabulary size whatever
the format, so its relative change (and the KL divergence beside it) measures how far
quantisation moves the output distribution, not a quality a trained model would have.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from zoo.app.bench.harness import BenchOptions, format_rows, register_bench
from zoo.app.decode_timer import read_bandwidth, time_decode, without_gc

SMOLLM2 = "smollm2-135m"
QUICK_MODEL = "attention-tiny"
CONTEXTS = (128, 2048)
EVAL_TOKENS = 4096  # held-out tokens scored per variant: 8 windows of 512
QUICK_EVAL_TOKENS = 1024
# --quick tokenises a tenth of the corpus subset: enough for its held-out tokens
QUICK_CORPUS_BYTES = 400_000
NEW_TOKENS = 32  # decode steps per timed run (the median interval between them is the figure)
QUICK_NEW_TOKENS = 8
REAL_PREFILL = 128  # tokens prefilled for real; longer KV caches are grown (time_decode)
# the targets (#24)
INT8_PPL_TARGET = 0.01  # int8 perplexity within 1% of fp32's
INT4_PPL_TARGET = 0.05  # calibrated int4 g32 within 5%
INT8_SPEED_TARGET = 0.6  # int8 ms/token at most 0.6x bf16's
BOUND_TARGET = 1.3  # every quantised path within 1.3x of its read bound
LLAMA_CPP_INSTALL = "pip install 'zoo[bench-llamacpp]' (llama-cpp-python, built from source)"
TORCHAO_INSTALL = "pip install zoo[bench-torchao]"
# zoo's variants also timed on torch's own weight-only kernels, and the formats torchao takes
ATEN_VARIANTS = ("int8", "int4 g32 rtn")
# a step as the rows name it -> generate's compile argument (never the native step: see above)
STEP_COMPILE = {"eager": False, "inductor": "inductor"}
FULL_STEPS = ("eager", "inductor")
QUICK_STEPS = ("eager",)  # --quick compiles nothing


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of storing a model's weights: float, quantised by zoo, a GGUF file's blocks kept
    quantised, or pruned (dense float, zeros in place)."""

    label: str
    weights: str  # "fp32", "bf16", "int8", "int4", "q4_1", "q8_0"
    group_size: int | None = None
    method: str | None = None  # "rtn", "gptq", "gguf" (a file's blocks as they are)
    prune: str | None = None  # "wanda", "sparsegpt", "magnitude"
    sparsity: str | None = None

    @property
    def quantized(self) -> bool:
        return self.weights not in ("fp32", "bf16")

    @property
    def calibrated(self) -> bool:
        return self.method == "gptq" or self.prune in ("wanda", "sparsegpt")

    @property
    def decode_dtype(self) -> torch.dtype:
        """Activations (and scales) while decoding: fp32 for the fp32 row, bf16 for the rest."""
        return torch.float32 if self.weights == "fp32" else torch.bfloat16


SMOLLM2_VARIANTS = (
    Variant("fp32", "fp32"),
    Variant("bf16", "bf16"),
    Variant("int8", "int8", method="rtn"),
    Variant("int4 g32 rtn", "int4", 32, "rtn"),
    Variant("int4 g32 gptq", "int4", 32, "gptq"),
    Variant("gguf q4_1", "q4_1", 32, "gguf"),
    Variant("gguf q8_0", "q8_0", 32, "gguf"),
    Variant("wanda 2:4", "bf16", prune="wanda", sparsity="2:4"),
    Variant("sparsegpt 2:4", "bf16", prune="sparsegpt", sparsity="2:4"),
)
QUICK_VARIANTS = (Variant("fp32", "fp32"), Variant("int8", "int8", method="rtn"),
                  Variant("int4 g32 rtn", "int4", 32, "rtn"))
FAMILY_VARIANTS = (Variant("int8", "int8", method="rtn"),
                   Variant("int4 g32 rtn", "int4", 32, "rtn"))
TORCHAO_VARIANTS = (Variant("torchao int8", "int8", method="rtn"),
                    Variant("torchao int4 g32", "int4", 32, "rtn"))


# --- building a variant -------------------------------------------------------------------------

def ungroupable_layers(model: torch.nn.Module, group_size: int) -> list[str]:
    """The linear layers quantize_model would take whose input width `group_size` does not
    divide (Mamba's dt_proj, KDA's low-rank f_b_proj): left float so the rest can be int4."""
    from zoo.compression import linear_targets

    return [name for name, linear in linear_targets(model) if linear.in_features % group_size]


@torch.no_grad()
def compress_variant(model: torch.nn.Module, variant: Variant,
                     calibration: torch.Tensor | None) -> list[str]:
    """Prune and / or quantise a float32 model in place as `variant` says (GGUF variants are
    loaded as they are, not made here); returns the layers left float."""
    from zoo.compression import prune_model, quantize_model

    if variant.method == "gguf":
        raise ValueError(f"variant {variant.label!r}: GGUF blocks are read from their file")
    if variant.prune is not None:
        prune_model(model, variant.prune, variant.sparsity, calibration)
    left_float: list[str] = []
    if variant.weights in ("int8", "int4"):
        if variant.group_size is not None:
            left_float = ungroupable_layers(model, variant.group_size)
        quantize_model(model, variant.weights, variant.group_size, left_float,
                       method=variant.method or "rtn", calibration=calibration)
    return left_float


# --- perplexity ---------------------------------------------------------------------------------

def held_out_batches(val_tokens: np.ndarray, n_tokens: int, seq_len: int) -> list[torch.Tensor]:
    """Consecutive held-out windows (1, seq_len) covering n_tokens: the windows `zoo compress
    --eval-tokens` scores, so the figures compare with its."""
    count = min(math.ceil(n_tokens / seq_len), len(val_tokens) // seq_len)
    if count < 1:
        raise ValueError(f"eval tokens {n_tokens}: the held-out split holds {len(val_tokens):,} "
                         f"tokens, fewer than one window of {seq_len}")
    return [torch.from_numpy(np.asarray(val_tokens[i * seq_len:(i + 1) * seq_len])
                             .astype(np.int64))[None] for i in range(count)]


@torch.no_grad()
def held_out_scores(model: torch.nn.Module, batches: list[torch.Tensor],
                    reference: list[torch.Tensor] | None = None,
                    keep_logprobs: bool = False) -> dict:
    """Perplexity over the batches (every position after each window's first), and with
    `reference` (a float model's log-probabilities of the same batches) the mean KL divergence
    from it in nats; with keep_logprobs, "logprobs" holds this model's own, to serve as a later
    reference (a tiny vocabulary's: SmolLM2's would take 0.8 GB)."""
    model.eval()
    nll, kl, count, logprobs = 0.0, 0.0, 0, []
    for i, ids in enumerate(batches):
        logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)
        nll -= float(logp.gather(-1, ids[:, 1:, None]).sum())
        count += ids[:, 1:].numel()
        if reference is not None:
            ref = reference[i]
            kl += float((ref.exp() * (ref - logp)).sum())
        if keep_logprobs:
            logprobs.append(logp)
    loss = nll / max(count, 1)
    return {"ppl": math.exp(min(loss, 80.0)), "tokens": count, "logprobs": logprobs,
            "kl": None if reference is None else kl / max(count, 1)}


# --- timing: figures whose runs are interleaved --------------------------------------------------

@dataclasses.dataclass
class Figure:
    """One decode figure: `measure()` gives (ms/token, state bytes) for one run; the row is
    what it reports beside them; read_bytes what a step reads of the weights."""

    row: dict
    read_bytes: int
    measure: Callable[[], tuple[float, int]]
    runs: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # (B/s, ms)
    state_bytes: int = 0

    def finished_row(self) -> dict:
        """The row with the median ms/token over runs and the read bound paired with each."""
        ms = [m for _, m in self.runs]
        read = self.read_bytes + self.state_bytes
        bounds = [1e3 * read / bandwidth for bandwidth, _ in self.runs]
        return {**self.row, "ms_per_token": statistics.median(ms),
                "state_bytes": self.state_bytes, "read_bytes": read,
                "read_GB_per_s": statistics.median(bw for bw, _ in self.runs) / 1e9,
                "bound_ms": statistics.median(bounds),
                "x_bound": statistics.median(m / b for m, b in zip(ms, bounds)),
                "runs": [(round(bw / 1e9, 1), round(m, 3)) for bw, m in self.runs]}


def time_figures(figures: list[Figure], rounds: int, device: str) -> list[dict]:
    """`rounds` runs of every figure, interleaved, each after a bandwidth measurement."""
    for _ in range(rounds):
        for figure in figures:
            bandwidth = read_bandwidth(device)
            ms, figure.state_bytes = figure.measure()
            figure.runs.append((bandwidth, ms))
    return [figure.finished_row() for figure in figures]


def zoo_figure(model, row: dict, context: int, new_tokens: int, compile: bool | str,
               read_bytes: int | None = None) -> Figure:
    """A figure of zoo's decode loop on `model` (warmed up here: a compiled step compiles);
    read_bytes: what a step reads of the weights, where `decode_read_bytes` cannot count them."""
    from zoo.compression import decode_read_bytes

    def measure() -> tuple[float, int]:
        timing = time_decode(model, context, new_tokens, compile=compile,
                             real_prefill=REAL_PREFILL)
        return timing.ms_per_token, timing.state_bytes

    time_decode(model, context, 4, compile=compile, real_prefill=REAL_PREFILL)
    return Figure(row, decode_read_bytes(model) if read_bytes is None else read_bytes, measure)


# --- llama.cpp ----------------------------------------------------------------------------------

def llama_cpp_missing() -> str | None:
    """Why llama.cpp cannot run here (the package is missing), or None."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as error:
        return f"llama-cpp-python is not installed ({error}); {LLAMA_CPP_INSTALL}"
    return None


def write_q8_0_gguf(source: Path, out: Path) -> Path:
    """A copy of the GGUF file `source` with its Q4_0 / Q4_1 matrices requantised to Q8_0 by
    gguf's own quantiser (from their dequantised values: the file holds no other weights), the
    rest and every metadata field as they are; returns `out`."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(out), arch=arch)
    four_bit = (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # the writer writes these itself
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == "general.file_type":
            value = int(gguf.LlamaFileType.MOSTLY_Q8_0)
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)
    tensors = []
    for tensor in reader.tensors:
        data, kind = tensor.data, tensor.tensor_type
        if kind in four_bit:
            data = gguf.quants.quantize(gguf.quants.dequantize(data, kind),
                                        gguf.GGMLQuantizationType.Q8_0)
            kind = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor_info(tensor.name, data.shape, data.dtype, data.nbytes, kind)
        tensors.append(data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for data in tensors:
        writer.write_tensor_data(data)
    writer.close()
    return out


def gguf_file_sizes(path: Path) -> dict:
    """What a decode step of llama.cpp reads from a GGUF file of a Llama layout: tensor bytes,
    weights, the bytes read per token (the token table one row at a time unless it is also the
    head), and its KV cache's bytes per token (f16 keys and values, llama.cpp's default)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()

    def meta(key: str) -> int:
        return int(reader.fields[f"{arch}.{key}"].contents())

    tensors = {t.name: t for t in reader.tensors}
    total = sum(int(t.n_bytes) for t in tensors.values())
    read = total
    table = tensors.get("token_embd.weight")
    if table is not None and "output.weight" in tensors:
        read -= int(table.n_bytes) - int(table.n_bytes) // int(table.shape[-1])
    head_dim = meta("embedding_length") // meta("attention.head_count")
    kv_per_token = 2 * meta("block_count") * meta("attention.head_count_kv") * head_dim * 2
    return {"weight_bytes": total, "weights": sum(int(t.n_elements) for t in tensors.values()),
            "read_bytes": read, "kv_bytes_per_token": kv_per_token}


def llama_cpp_model(path: Path, n_ctx: int, threads: int, logits_all: bool = False):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads,
                           n_threads_batch=threads, logits_all=logits_all, verbose=False)


def llama_cpp_perplexity(path: Path, batches: list[torch.Tensor], threads: int) -> float:
    """Perplexity from llama.cpp's logits on the same windows zoo scores."""
    seq_len = batches[0].shape[1]
    llm = llama_cpp_model(path, seq_len, threads, logits_all=True)
    nll, count = 0.0, 0
    for ids in batches:
        tokens = ids[0].tolist()
        llm.reset()
        llm.eval(tokens)
        logits = torch.from_numpy(np.array(llm.scores[:len(tokens) - 1], dtype=np.float32))
        logp = torch.log_softmax(logits, -1)
        nll -= float(logp.gather(-1, torch.tensor(tokens[1:])[:, None]).sum())
        count += len(tokens) - 1
    del llm
    return math.exp(nll / count)


def llama_cpp_figure(path: Path, row: dict, context: int, new_tokens: int, threads: int,
                     sizes: dict, vocab_size: int) -> Figure:
    """A figure of llama.cpp decoding after a real prefill of `context` random tokens: each run
    rewinds to the prompt (eval drops the KV entries past n_tokens) and times single-token
    evals, the median interval between them."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (context + new_tokens,), generator=generator).tolist()
    llm = llama_cpp_model(path, context + new_tokens + 1, threads)
    llm.eval(ids[:context])

    def measure() -> tuple[float, int]:
        llm.n_tokens = context
        stamps = []
        with without_gc():  # as time_decode times zoo's steps
            for token in ids[context:]:
                llm.eval([token])
                stamps.append(time.perf_counter())
        ms = 1e3 * statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
        return ms, sizes["kv_bytes_per_token"] * context

    return Figure(row, sizes["read_bytes"], measure)


# --- the bench ----------------------------------------------------------------------------------

def _corpus(src: str, tokenizer, max_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    from zoo.app.compress import CORPUS_BYTES, corpus_tokens

    return corpus_tokens(src, tokenizer, max_bytes or CORPUS_BYTES)


def _variant_row(model_name: str, variant: Variant, model, scores: dict, float_ppl: float | None,
                 left_float: list[str]) -> dict:
    from zoo.compression import logical_parameters, weight_bytes

    weights = weight_bytes(model)
    return {"kind": "decode", "engine": "zoo", "model": model_name, "variant": variant.label,
            "weights": variant.weights, "group_size": variant.group_size,
            "method": variant.method, "prune": variant.prune, "sparsity": variant.sparsity,
            "dtype": str(variant.decode_dtype).replace("torch.", ""),
            "ppl": scores["ppl"], "ppl_tokens": scores["tokens"],
            "ppl_change": None if float_ppl is None else scores["ppl"] / float_ppl - 1,
            "weight_bytes": weights, "bytes_per_weight": weights / logical_parameters(model),
            "left_float": len(left_float), "threads": torch.get_num_threads()}


def decode_figures(model_name: str, variants: tuple[Variant, ...], load_float: Callable,
                   load_gguf: Callable[[str], object], corpus, batches, calibration,
                   contexts: tuple[int, ...], new_tokens: int, compile: bool | str,
                   device: str, aten_steps: tuple[str, ...] = ()) -> list[Figure]:
    """Per variant: build it, score it on the held-out batches (float32 activations, the bf16
    row in bf16), cast it to its decode dtype and warm a figure up per context; the
    ATEN_VARIANTS also once per `aten_steps` step as engine "torch aten" (the same model)."""
    from zoo.app.bench.decode import compiled_step_kind

    figures, float_ppl = [], None
    for variant in variants:
        if variant.method == "gguf":
            model, left_float = load_gguf(variant.weights), []
        else:
            model = load_float()
            left_float = compress_variant(model, variant, calibration)
        if variant.weights == "bf16" and variant.prune is None:
            model = model.to(torch.bfloat16)
        scores = held_out_scores(model, batches)
        if variant.weights == "fp32":
            float_ppl = scores["ppl"]
        model = model.to(device=device, dtype=variant.decode_dtype).eval()
        row = _variant_row(model_name, variant, model, scores, float_ppl, left_float)
        step = (compiled_step_kind(model, device) if compile is True
                else compile or "eager")
        for context in contexts:
            figures.append(zoo_figure(model, {**row, "context": context, "step": step},
                                      context, new_tokens, compile))
        for aten_step in aten_steps if variant.label in ATEN_VARIANTS else ():
            aten_row = {**row, "engine": "torch aten",
                        "variant": f"{variant.label} aten {aten_step}", "step": aten_step}
            for context in contexts:
                figures.append(zoo_figure(model, {**aten_row, "context": context}, context,
                                          new_tokens, STEP_COMPILE[aten_step]))
    return figures


def llama_cpp_rows_or_figures(gguf_files: dict[str, Path], batches, contexts, new_tokens: int,
                              vocab_size: int, float_ppl: float | None
                              ) -> tuple[list[dict], list[Figure]]:
    """([a skipped row naming why], []) without llama-cpp-python; else ([], a figure per file
    and context, with llama.cpp's perplexity on the same windows)."""
    missing = llama_cpp_missing()
    if missing is not None:
        return [{"kind": "skipped", "engine": "llama.cpp", "model": SMOLLM2,
                 "reason": missing}], []
    import llama_cpp

    threads = torch.get_num_threads()
    figures = []
    for format, path in gguf_files.items():
        sizes = gguf_file_sizes(path)
        ppl = llama_cpp_perplexity(path, batches, threads)
        row = {"kind": "decode", "engine": "llama.cpp", "model": SMOLLM2,
               "variant": f"llama.cpp {format}", "weights": format, "group_size": 32,
               "method": "gguf", "prune": None, "sparsity": None, "dtype": "float32",
               "ppl": ppl, "ppl_tokens": sum(b.shape[1] - 1 for b in batches),
               "ppl_change": None if float_ppl is None else ppl / float_ppl - 1,
               "weight_bytes": sizes["weight_bytes"],
               "bytes_per_weight": sizes["weight_bytes"] / sizes["weights"], "left_float": 0,
               "threads": threads, "step": f"llama-cpp-python {llama_cpp.__version__}",
               "file": path.name}
        for context in contexts:
            figures.append(llama_cpp_figure(path, {**row, "context": context}, context,
                                            new_tokens, threads, sizes, vocab_size))
    return [], figures


# --- torchao -------------------------------------------------------------------------------------

def torchao_missing() -> str | None:
    """Why torchao cannot run here (the package is missing), or None."""
    try:
        import torchao  # noqa: F401
    except ImportError as error:
        return f"torchao not installed: {TORCHAO_INSTALL} ({error})"
    return None


def torchao_config(variant: Variant):
    """torchao's weight-only config for a TORCHAO_VARIANTS entry (a CPU int4 layout for int4).
    set_inductor_config=False: torchao would otherwise change inductor's process-wide options,
    and its compiled step is to run under the options zoo's runs under."""
    if variant.weights == "int8" and variant.group_size is None:
        from torchao.quantization import Int8WeightOnlyConfig

        return Int8WeightOnlyConfig(set_inductor_config=False)
    if variant.weights == "int4" and variant.group_size is not None:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        return PrototypeInt4WeightOnlyConfig(group_size=variant.group_size,
                                             set_inductor_config=False)
    raise ValueError(f"variant {variant.label!r}: torchao runs int8 per channel or int4 with a "
                     f"group_size, not weights={variant.weights!r} group_size="
                     f"{variant.group_size!r}")


@torch.no_grad()
def torchao_quantize(model: torch.nn.Module, variant: Variant) -> list[str]:
    """Quantise, in place and in the model's own dtype, the linear layers zoo's quantize_model
    takes with torchao's weight-only config for `variant`; returns the layers left float."""
    from torchao.quantization import quantize_

    from zoo.compression import linear_targets

    left_float = (ungroupable_layers(model, variant.group_size)
                  if variant.group_size is not None else [])
    targets = {name for name, _ in linear_targets(model)} - set(left_float)
    quantize_(model, torchao_config(variant), filter_fn=lambda module, name: name in targets)
    return left_float


def stored_bytes(tensor: torch.Tensor) -> int:
    """The bytes a tensor holds: a tensor subclass's (torchao's) inner tensors, summed."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, name)) for name in names
                   if getattr(tensor, name) is not None)
    return tensor.numel() * tensor.element_size()


def torchao_sizes(model: torch.nn.Module) -> dict:
    """A torchao-quantised model's weight bytes (every parameter once, its codes and scales as
    stored) and what a decode step reads of them (an embedding table the head does not share
    one row per token), as `decode_read_bytes` counts a zoo model's."""
    total = sum(stored_bytes(p) for p in model.parameters())  # tied parameters once
    table = model.get_input_embeddings().weight
    read = total
    if model.get_output_embeddings().weight is not table:
        read -= stored_bytes(table) - stored_bytes(table[0])
    return {"weight_bytes": total, "read_bytes": read}


def torchao_rows_or_figures(model_name: str, load_float: Callable, batches,
                            contexts: tuple[int, ...], new_tokens: int, float_ppl: float | None,
                            steps: tuple[str, ...], device: str
                            ) -> tuple[list[dict], list[Figure]]:
    """([a skipped row naming why], []) without torchao; else ([], a figure per
    TORCHAO_VARIANTS entry, step and context): perplexity of the float32 model quantised by
    torchao, decode of the bf16 one (module doc)."""
    missing = torchao_missing()
    if missing is not None:
        return [{"kind": "skipped", "engine": "torchao", "model": model_name,
                 "reason": missing}], []
    import torchao

    from zoo.compression import logical_parameters

    figures = []
    for variant in TORCHAO_VARIANTS:
        scored = load_float()
        torchao_quantize(scored, variant)
        scores = held_out_scores(scored, batches)
        del scored
        model = load_float().to(device=device, dtype=torch.bfloat16).eval()
        left_float = torchao_quantize(model, variant)
        sizes = torchao_sizes(model)
        row = {"kind": "decode", "engine": "torchao", "model": model_name,
               "weights": variant.weights, "group_size": variant.group_size,
               "method": variant.method, "prune": None, "sparsity": None, "dtype": "bfloat16",
               "ppl": scores["ppl"], "ppl_tokens": scores["tokens"],
               "ppl_change": None if float_ppl is None else scores["ppl"] / float_ppl - 1,
               "weight_bytes": sizes["weight_bytes"],
               "bytes_per_weight": sizes["weight_bytes"] / logical_parameters(model),
               "left_float": len(left_float), "threads": torch.get_num_threads(),
               "torchao": torchao.__version__}
        for step in steps:
            step_row = {**row, "variant": f"{variant.label} {step}", "step": step}
            for context in contexts:
                figures.append(zoo_figure(model, {**step_row, "context": context}, context,
                                          new_tokens, STEP_COMPILE[step], sizes["read_bytes"]))
    return [], figures


def family_rows(names: list[str], eval_tokens: int, budget_s: float,
                corpus: tuple[np.ndarray, np.ndarray] | None = None) -> list[dict]:
    """Per tiny config (random weights, seed 0): int8 and int4 g32 against float32 on the same
    held-out bytes (`corpus`: the byte tokenizer's (train, held-out) tokens, read here when
    None): perplexity, its relative change, the mean KL divergence and the bytes (float
    tensors in float32)."""
    from zoo.app.compress import SEQ_LEN
    from zoo.compression import logical_parameters, weight_bytes
    from zoo.config import load_config
    from zoo.model import ZooForCausalLM
    from zoo.tokenizer import ByteTokenizer

    rows, start = [], time.perf_counter()
    for name in names:
        if time.perf_counter() - start > budget_s:
            rows.append({"kind": "skipped", "engine": "zoo", "model": name,
                         "reason": f"past the bench's budget of {budget_s:.0f} s"})
            continue
        torch.manual_seed(0)
        base = ZooForCausalLM(load_config(name)).eval()
        if corpus is None:
            corpus = _corpus(name, ByteTokenizer())
        limit = base.sequence_limit()
        batches = held_out_batches(corpus[1], eval_tokens,
                                   SEQ_LEN if limit is None else min(SEQ_LEN, limit[0]))
        reference = held_out_scores(base, batches, keep_logprobs=True)
        float_bytes = weight_bytes(base)
        rows.append({"kind": "family", "model": name, "variant": "fp32", "weights": "fp32",
                     "ppl": reference["ppl"], "ppl_change": 0.0, "kl_nats": 0.0,
                     "weight_bytes": float_bytes,
                     "bytes_per_weight": float_bytes / logical_parameters(base), "left_float": 0})
        for variant in FAMILY_VARIANTS:
            torch.manual_seed(0)  # a config of its own: quantize_model writes its section there
            model = ZooForCausalLM(load_config(name)).eval()
            left_float = compress_variant(model, variant, None)
            scores = held_out_scores(model, batches, reference["logprobs"])
            nbytes = weight_bytes(model)
            rows.append({"kind": "family", "model": name, "variant": variant.label,
                         "weights": variant.weights, "ppl": scores["ppl"],
                         "ppl_change": scores["ppl"] / reference["ppl"] - 1,
                         "kl_nats": scores["kl"], "weight_bytes": nbytes,
                         "bytes_per_weight": nbytes / logical_parameters(model),
                         "left_float": len(left_float)})
    return rows


def _tiny_names() -> list[str]:
    from zoo.config import shipped_configs

    return [name for name in shipped_configs() if name.endswith("-tiny")]


@torch.no_grad()
def compress_rows(options: BenchOptions) -> list[dict]:
    """The rows of `zoo bench compress` (module doc); --quick: attention-tiny only."""
    from zoo.app.compress import DEFAULT_CALIBRATION_TOKENS, SEQ_LEN, calibration_windows

    rounds = 1 if options.quick else max(3, options.repeats)
    if options.quick:
        from zoo.config import load_config
        from zoo.model import ZooForCausalLM
        from zoo.tokenizer import ByteTokenizer

        def load_tiny():
            torch.manual_seed(0)
            return ZooForCausalLM(load_config(QUICK_MODEL)).eval()

        corpus = _corpus(QUICK_MODEL, ByteTokenizer(), QUICK_CORPUS_BYTES)
        batches = held_out_batches(corpus[1], QUICK_EVAL_TOKENS, SEQ_LEN)
        figures = decode_figures(QUICK_MODEL, QUICK_VARIANTS, load_tiny, None, corpus, batches,
                                 None, (CONTEXTS[0],), QUICK_NEW_TOKENS, False, options.device,
                                 QUICK_STEPS)
        float_ppl = next((f.row["ppl"] for f in figures if f.row["weights"] == "fp32"), None)
        torchao_skipped, torchao_figures = torchao_rows_or_figures(
            QUICK_MODEL, load_tiny, batches, (CONTEXTS[0],), QUICK_NEW_TOKENS, float_ppl,
            QUICK_STEPS, options.device)
        rows = time_figures(figures + torchao_figures, rounds, options.device)
        rows.append({"kind": "skipped", "engine": "llama.cpp", "model": SMOLLM2,
                     "reason": "--quick runs neither SmolLM2 nor llama.cpp"})
        rows += torchao_skipped
        return rows + family_rows([QUICK_MODEL], QUICK_EVAL_TOKENS, options.budget_s, corpus)

    from transformers import AutoTokenizer

    from zoo.hf_import import from_hf, smollm2_path

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path().parent,
                                              gguf_file=smollm2_path().name)
    corpus = _corpus(SMOLLM2, tokenizer)
    batches = held_out_batches(corpus[1], EVAL_TOKENS, SEQ_LEN)
    calibration = calibration_windows(corpus[0], DEFAULT_CALIBRATION_TOKENS, SEQ_LEN)
    with tempfile.TemporaryDirectory(prefix="zoo-bench-compress-") as folder:
        gguf_files = {"q4_1": smollm2_path(),
                      "q8_0": write_q8_0_gguf(smollm2_path(), Path(folder) / "smollm2-q8_0.gguf")}
        figures = decode_figures(
            SMOLLM2, SMOLLM2_VARIANTS, lambda: from_hf(SMOLLM2),
            lambda format: from_hf(gguf_files[format], quantized=True), corpus, batches,
            calibration, CONTEXTS, NEW_TOKENS, True, options.device, FULL_STEPS)
        float_ppl = next((f.row["ppl"] for f in figures if f.row["weights"] == "fp32"), None)
        skipped, llama_figures = llama_cpp_rows_or_figures(
            gguf_files, batches, CONTEXTS, NEW_TOKENS, tokenizer.vocab_size, float_ppl)
        torchao_skipped, torchao_figures = torchao_rows_or_figures(
            SMOLLM2, lambda: from_hf(SMOLLM2), batches, CONTEXTS, NEW_TOKENS, float_ppl,
            FULL_STEPS, options.device)
        rows = (time_figures(figures + llama_figures + torchao_figures, rounds, options.device)
                + skipped + torchao_skipped)
    return rows + family_rows(_tiny_names(), EVAL_TOKENS, options.budget_s)


# --- the report ---------------------------------------------------------------------------------

def _find(rows: list[dict], variant: str, context: int | None = None) -> dict | None:
    return next((r for r in rows if r.get("kind") == "decode" and r["variant"] == variant
                 and (context is None or r["context"] == context)), None)


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def target_sentences(rows: list[dict]) -> list[str]:
    """The issue's targets, each checked in a sentence from the rows (or said to be missing)."""
    lines = []
    fp32 = _find(rows, "fp32")
    for variant, target, what in (("int8", INT8_PPL_TARGET, "int8 (RTN)"),
                                  ("int4 g32 gptq", INT4_PPL_TARGET, "int4 g32 (GPTQ)")):
        row = _find(rows, variant)
        if fp32 is None or row is None:
            lines.append(f"{what} perplexity within {target:.0%} of fp32: not measured "
                         f"(no {'fp32' if fp32 is None else variant} row).")
            continue
        change = row["ppl"] / fp32["ppl"] - 1
        lines.append(f"{row['model']} {what} perplexity {row['ppl']:.3f} vs fp32 {fp32['ppl']:.3f} "
                     f"({change:+.2%}); within {target:.0%}: {_yes(change <= target)}.")
    contexts = sorted({r["context"] for r in rows if r.get("kind") == "decode"})
    for context in contexts:
        int8, bf16 = _find(rows, "int8", context), _find(rows, "bf16", context)
        if int8 is None or bf16 is None:
            lines.append(f"int8 decode at most {INT8_SPEED_TARGET}x bf16's at {context} "
                         "context: not measured (no int8 or bf16 row).")
        else:
            ratio = int8["ms_per_token"] / bf16["ms_per_token"]
            lines.append(f"{int8['model']} int8 decode at {context} context: "
                         f"{int8['ms_per_token']:.2f} ms/token "
                         f"vs bf16 {bf16['ms_per_token']:.2f} (x{ratio:.2f}); at most "
                         f"x{INT8_SPEED_TARGET}: {_yes(ratio <= INT8_SPEED_TARGET)}.")
    skipped = next((r for r in rows if r.get("kind") == "skipped"
                    and r.get("engine") == "llama.cpp"), None)
    for format in ("q4_1", "q8_0"):
        for context in contexts:
            zoo_row = _find(rows, f"gguf {format}", context)
            llama = _find(rows, f"llama.cpp {format}", context)
            what = (f"zoo faster than llama.cpp on the same {format.upper()} file at {context} "
                    "context")
            if zoo_row is None or llama is None:
                why = (skipped["reason"] if llama is None and skipped is not None
                       else "no zoo or llama.cpp row")
                lines.append(f"{what}: not measured ({why}).")
                continue
            speedup = llama["ms_per_token"] / zoo_row["ms_per_token"]
            lines.append(f"{what} ({zoo_row['threads']} threads each): zoo "
                         f"{zoo_row['ms_per_token']:.2f} ms/token, llama.cpp "
                         f"{llama['ms_per_token']:.2f} (x{speedup:.2f}): "
                         f"{_yes(speedup > 1.0)}.")
    quantized = [r for r in rows if r.get("kind") == "decode" and r["engine"] == "zoo"
                 and r["weights"] not in ("fp32", "bf16") and r.get("x_bound") is not None]
    if not quantized:
        lines.append(f"every quantised path within x{BOUND_TARGET} of its read bound: not "
                     "measured (no quantised zoo row).")
    else:
        over = [r for r in quantized if r["x_bound"] > BOUND_TARGET]
        worst = max(quantized, key=lambda r: r["x_bound"])
        named = ", ".join(f"{r['variant']} at {r['context']}" for r in over)
        lines.append(
            f"every quantised zoo path within x{BOUND_TARGET} of its read bound: "
            f"{_yes(not over)} (worst: {worst['variant']} at {worst['context']} context, "
            f"x{worst['x_bound']:.2f}" + (f"; over: {named}" if over else "") + ").")
    return lines


def kernel_sentences(rows: list[dict]) -> list[str]:
    """Per format and context, zoo's own step's ms/token beside torch's aten kernels' and
    torchao's at each step (x: their ms/token over zoo's), and torchao's perplexity beside
    zoo's; an engine without rows is said to be missing, with a skipped row's reason."""
    lines = []
    decode = [r for r in rows if r.get("kind") == "decode"]
    contexts = sorted({r["context"] for r in decode})
    for weights, zoo_variant in (("int8", "int8"), ("int4", "int4 g32 rtn")):
        for context in contexts:
            zoo_row = _find(rows, zoo_variant, context)
            if zoo_row is None:
                continue
            parts = [f"zoo {zoo_row['ms_per_token']:.2f} ({zoo_row['step']})"]
            if zoo_row["step"] == "eager":  # --quick: zoo's eager step is QuantizedLinear's
                parts[0] += ", torch aten's kernels too"
            for engine in ("torch aten", "torchao"):
                found = [r for r in decode if r["engine"] == engine and r["weights"] == weights
                         and r["context"] == context]
                if not found:
                    skipped = next((r for r in rows if r.get("kind") == "skipped"
                                    and r.get("engine") == engine), None)
                    parts.append(f"{engine} not measured"
                                 + (f" ({skipped['reason']})" if skipped else ""))
                    continue
                parts.append(f"{engine} " + ", ".join(
                    f"{r['ms_per_token']:.2f} ({r['step']}, "
                    f"x{r['ms_per_token'] / zoo_row['ms_per_token']:.2f})" for r in found))
            lines.append(f"{zoo_row['model']} {zoo_variant} at {context} context, ms/token: "
                         + "; ".join(parts) + ".")
        zoo_row = _find(rows, zoo_variant)
        torchao = next((r for r in decode if r["engine"] == "torchao"
                        and r["weights"] == weights), None)
        if zoo_row is not None and torchao is not None:
            lines.append(f"{zoo_row['model']} {zoo_variant} perplexity: zoo {zoo_row['ppl']:.3f}, "
                         f"torchao {torchao['ppl']:.3f}.")
    return lines


REPORT_COLUMNS = ("engine", "variant", "context", "step", "ppl", "ppl_change", "weight_bytes",
                  "bytes_per_weight", "ms_per_token", "bound_ms", "x_bound", "read_GB_per_s")
FAMILY_COLUMNS = ("model", "variant", "ppl", "ppl_change", "kl_nats", "weight_bytes",
                  "bytes_per_weight", "left_float")


def compress_report(rows: list[dict]) -> str:
    """The decode table, the tiny configs' table, what was skipped, and the targets checked."""
    decode = [{k: r.get(k) for k in REPORT_COLUMNS} for r in rows if r.get("kind") == "decode"]
    family = [{k: r.get(k) for k in FAMILY_COLUMNS} for r in rows if r.get("kind") == "family"]
    parts = []
    if decode:
        models = ", ".join(dict.fromkeys(r["model"] for r in rows if r.get("kind") == "decode"))
        parts += [f"## {models}: perplexity (float32 activations), bytes, decode ms/token "
                  "(bf16 activations but for fp32) against the read bound", "",
                  format_rows(decode), ""]
    if family:
        parts += ["## Every tiny config (random weights): int8 and int4 g32 RTN against "
                  "float32 on the same held-out bytes", "",
                  "Random weights put perplexity near the vocabulary size in every format: the "
                  "relative change and the KL divergence say how far quantisation moves the "
                  "output distribution, not a trained model's loss of quality. left_float: the "
                  "layers whose input width 32 does not divide, left float.", "",
                  format_rows(family), ""]
    for r in rows:
        if r.get("kind") == "skipped":
            parts.append(f"Skipped {r['engine']} ({r['model']}): {r['reason']}.")
    kernels = kernel_sentences(rows)
    if kernels:
        parts += ["", "## zoo's step beside torch's aten kernels and torchao's (same threads, "
                  "same run; x: their ms/token over zoo's)", ""] + [f"- {line}" for line in kernels]
    parts += ["", "## The issue's targets", ""] + [f"- {line}" for line in target_sentences(rows)]
    return "\n".join(parts)


# each engine's bar colour on the plot
ENGINE_COLOURS = {"zoo": "tab:blue", "llama.cpp": "tab:red", "torch aten": "tab:green",
                  "torchao": "tab:orange"}


def compress_plot(rows: list[dict], path: Path) -> None:
    """Decode ms/token of every variant as a bar, fastest first, coloured by engine, with each
    one's read bound marked; one panel per context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    decode = [r for r in rows if r.get("kind") == "decode"]
    contexts = sorted({r["context"] for r in decode})
    if not contexts:
        return
    height = 1.2 + 0.28 * max(sum(r["context"] == c for r in decode) for c in contexts)
    fig, axes = plt.subplots(1, len(contexts), figsize=(6.5 * len(contexts), height),
                             squeeze=False)
    for ax, context in zip(axes[0], contexts):
        shown = sorted((r for r in decode if r["context"] == context),
                       key=lambda r: -r["ms_per_token"])
        places = range(len(shown))
        ax.barh(places, [r["ms_per_token"] for r in shown],
                color=[ENGINE_COLOURS[r["engine"]] for r in shown])
        ax.scatter([r["bound_ms"] for r in shown], places, marker="|", s=120, color="black",
                   zorder=3)
        ax.set_yticks(list(places), [
            r["variant"] if r["variant"].startswith(r["engine"]) else
            f"{r['engine']} {r['variant']}" + (f" ({r['step']})" if r["engine"] == "zoo" else "")
            for r in shown], fontsize=7)
        ax.set_xlabel("decode ms/token (black tick: the variant's read bound)")
        models = ", ".join(dict.fromkeys(r["model"] for r in decode))
        ax.set_title(f"{models}, {context}-token context", fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
    engines = dict.fromkeys(r["engine"] for r in decode)
    axes[0][-1].legend(handles=[Patch(color=ENGINE_COLOURS[e], label=e) for e in engines],
                       fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@register_bench(
    "compress",
    "SmolLM2-135M compressed (int8, int4 RTN/GPTQ, GGUF Q4_1/Q8_0, Wanda/SparseGPT 2:4): "
    "perplexity, bytes, decode ms/token at 128 and 2k vs the read bound, llama.cpp, torch's aten "
    "int8/int4 kernels and torchao; every tiny config in int8 and int4",
    plot=compress_plot,
    report=compress_report,
)
def bench_compress(options: BenchOptions) -> list[dict]:
    return compress_rows(options)
