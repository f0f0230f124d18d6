"""`zoo compress SRC OUT`: prune and / or quantise a model into a new model folder that
`zoo generate`, `zoo info` and `AutoModelForCausalLM.from_pretrained` take as they are.

    zoo compress smollm2-135m runs/smollm2-int4 --weights int4 --group-size 32
    zoo compress runs/my-model runs/my-model-24 --prune wanda --sparsity 2:4 --weights int8
    zoo compress attention-tiny runs/tiny-int8 --weights int8 --eval-tokens 8192
    zoo compress smollm2-135m runs/smollm2-gptq --weights int4 --method gptq --calibration 8192
    zoo compress smollm2-135m runs/smollm2-sgpt --prune sparsegpt --sparsity 2:4
    zoo compress attention-small runs/small-q4_1 --weights q4_1 --kv int8

SRC is anything `zoo generate` takes. Pruning runs first (on the float weights), quantising
second (GPTQ keeps the pruned zeros). --weights q8_0|q4_0|q4_1 stores GGUF's own blocks (gguf's
quantiser, groups of 32); --kv sets what attention's KV cache holds while decoding. The
calibration tokens of wanda, sparsegpt and gptq come from the training split of the default
corpus (the Python standard library's source, zoo.train.data), tokenised with the model's
tokenizer; with --eval-tokens the held-out split of the same corpus gives the perplexity before
and after.
OUT is written in a temporary folder beside it and renamed, so it is whole or absent.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from zoo.app.cli import human_bytes
from zoo.compression import (
    GGUF_FORMATS,
    INT4_GROUP_SIZES,
    PRUNING_METHODS,
    QUANTIZATION_METHODS,
    WEIGHT_FORMATS,
    CompressionError,
    check_quantization_args,
    decode_read_bytes,
    logical_parameters,
    parse_sparsity,
    prune_model,
    quantize_model,
    quantize_model_gguf,
    weight_bytes,
)
from zoo.layers.attention import KV_CACHE_FORMATS, Attention, apply_kv_cache

# The subset of the default corpus calibration and held-out text come from: the SmolLM2
# distillation configs' data.max_bytes, so the token cache they built serves here too.
CORPUS_BYTES = 4_000_000
VAL_FRACTION = 0.05  # zoo.train's default held-out share
SEQ_LEN = 512  # tokens per calibration / evaluation window (shorter where the model limits it)
DEFAULT_CALIBRATION_TOKENS = 8192
DEFAULT_INT4_GROUP_SIZE = 32
# the command-line flag of each argument a CompressionError names (quantize_model's method is
# --method, prune_model's is --prune)
FLAGS = {"weights": "--weights", "group_size": "--group-size", "sparsity": "--sparsity",
         "method": "--prune", "calibration": "--calibration", "skip": "--skip"}
QUANTIZE_FLAGS = {**FLAGS, "method": "--method"}
# the methods that run block by block on calibration tokens
CALIBRATED_PRUNING = ("wanda", "sparsegpt")
CALIBRATED_QUANTIZATION = ("gptq",)


def add_compress_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="what zoo generate takes: a model folder, a shipped config name "
                   "(random weights), a transformers folder / GGUF file, or smollm2-135m")
    p.add_argument("out", help="the model folder to write")
    p.add_argument("--weights", help="weight-only quantisation: "
                   f"{' or '.join((*WEIGHT_FORMATS, *GGUF_FORMATS))} (int8: symmetric per output "
                   "channel; int4: groups along the input with scale and zero; q8_0, q4_0, "
                   "q4_1: GGUF's blocks of 32, as gguf's quantiser writes them)")
    p.add_argument("--method", default=None, metavar="METHOD",
                   help=f"with --weights, how codes are chosen: {' or '.join(QUANTIZATION_METHODS)}"
                   " (rtn: round to nearest, the default; gptq: column by column with the error "
                   "fed to the columns not yet quantised, calibrated on the default corpus)")
    p.add_argument("--group-size", type=int, help="int4 inputs per scale: "
                   f"{', '.join(map(str, INT4_GROUP_SIZES))} (default "
                   f"{DEFAULT_INT4_GROUP_SIZE})")
    p.add_argument("--prune", metavar="METHOD",
                   help=f"pruning score: {' or '.join(PRUNING_METHODS)} (wanda: |W| times the "
                   "input channel's norm on calibration text; sparsegpt: the inverse Hessian's "
                   "saliency, the kept weights updated to make up for the pruned ones)")
    p.add_argument("--sparsity", default=None,
                   help="with --prune: a fraction in (0, 1) pruned per output row, or N:M (2:4, "
                   "4:8) kept per M inputs (default 0.5)")
    p.add_argument("--kv", default=None, metavar="FORMAT",
                   help=f"attention's KV cache while decoding: {' or '.join(KV_CACHE_FORMATS)} "
                   "(int8: per token; int4: KIVI, keys per channel, values per token, the newest "
                   "tokens kept exact)")
    p.add_argument("--calibration", type=int, default=DEFAULT_CALIBRATION_TOKENS,
                   metavar="N_TOKENS", help="calibration tokens for wanda, sparsegpt and gptq "
                   f"(default {DEFAULT_CALIBRATION_TOKENS})")
    p.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                   help="leave the linear layers whose names match this glob float and dense "
                   "(repeatable), e.g. '*.dt_proj'")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the float tensors of the result (scales, norms, embedding)")
    p.add_argument("--eval-tokens", type=int, default=0, metavar="N_TOKENS",
                   help="held-out perplexity of SRC and of the result over N tokens (0: none)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT when it is a model folder already")


def cli_error(error: CompressionError, flags: dict[str, str] = FLAGS) -> ValueError:
    """The library's error, naming the command-line flag in place of the argument."""
    return ValueError(f"{flags.get(error.option, error.option)} {error.value}: {error.detail}")


def check_compress_request(args: argparse.Namespace) -> None:
    """Every option, each named when it is wrong, before anything is loaded; fills in the
    defaults that depend on others (the int4 group size, the sparsity)."""
    if args.method is not None:
        if args.weights is None:
            raise ValueError(f"--method {args.method}: applies to --weights")
        if args.method not in QUANTIZATION_METHODS:
            raise ValueError(f"--method {args.method}: allowed: "
                             f"{', '.join(QUANTIZATION_METHODS)}")
    if args.weights is None and args.prune is None and args.kv is None:
        raise ValueError(f"give --weights ({', '.join((*WEIGHT_FORMATS, *GGUF_FORMATS))}), "
                         f"--prune ({', '.join(PRUNING_METHODS)}) and / or --kv "
                         f"({', '.join(KV_CACHE_FORMATS)})")
    if args.kv is not None and args.kv not in KV_CACHE_FORMATS:
        raise ValueError(f"--kv {args.kv}: allowed: {', '.join(KV_CACHE_FORMATS)}")
    if args.weights is not None and args.weights not in (*WEIGHT_FORMATS, *GGUF_FORMATS):
        raise ValueError(f"--weights {args.weights}: allowed: "
                         f"{', '.join((*WEIGHT_FORMATS, *GGUF_FORMATS))}")
    if args.weights in GGUF_FORMATS:
        if args.group_size is not None:
            raise ValueError(f"--group-size {args.group_size}: --weights {args.weights} stores "
                             "GGUF's blocks of 32; drop --group-size")
        if args.method not in (None, "rtn"):
            raise ValueError(f"--method {args.method}: --weights {args.weights} is gguf's own "
                             "round to nearest; use int8 / int4 for gptq")
    elif args.weights is not None:
        if args.weights == "int4" and args.group_size is None:
            args.group_size = DEFAULT_INT4_GROUP_SIZE
        try:
            check_quantization_args(args.weights, args.group_size)
        except CompressionError as error:
            raise cli_error(error) from None
    elif args.group_size is not None:
        raise ValueError(f"--group-size {args.group_size}: applies to --weights int4")
    if args.prune is None:
        if args.sparsity is not None:
            raise ValueError(f"--sparsity {args.sparsity}: applies with --prune")
    else:
        if args.prune not in PRUNING_METHODS:
            raise ValueError(f"--prune {args.prune}: allowed: {', '.join(PRUNING_METHODS)}")
        try:
            args.sparsity = parse_sparsity("0.5" if args.sparsity is None else args.sparsity)
        except CompressionError as error:
            raise cli_error(error) from None
    if args.calibration < 1:
        raise ValueError(f"--calibration {args.calibration}: must be a positive token count")
    if args.eval_tokens < 0:
        raise ValueError(f"--eval-tokens {args.eval_tokens}: must be >= 0")
    out = Path(args.out)
    replaceable = args.overwrite and (out / "config.json").is_file()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not replaceable:
        raise ValueError(f"{out}: exists and is not empty; name a new folder (or pass "
                         "--overwrite to replace a model folder)")


def run_compress_command(args: argparse.Namespace) -> int:
    from zoo.infer.text import load_for_generation

    check_compress_request(args)
    model, tokenizer, note = load_for_generation(args.src, torch.float32, "cpu")
    if note:
        print(f"note: {note}", file=sys.stderr)
    seq_len = SEQ_LEN
    limit = model.sequence_limit()
    if limit is not None:
        seq_len = min(seq_len, limit[0])
    method = args.method or "rtn"
    calibrated = args.prune in CALIBRATED_PRUNING or method in CALIBRATED_QUANTIZATION
    corpus = calibration = None
    if calibrated or args.eval_tokens:
        corpus = corpus_tokens(args.src, tokenizer)
    if calibrated:
        calibration = calibration_windows(corpus[0], args.calibration, seq_len)
    before = held_out_perplexity(model, corpus, args.eval_tokens, seq_len)
    source_bytes = weight_bytes(model, getattr(torch, args.dtype))
    if args.prune is not None:
        try:
            result = prune_model(model, args.prune, args.sparsity, calibration, args.skip)
        except CompressionError as error:
            raise cli_error(error) from None
        print(f"pruned {len(result.sparsity)} linear layers ({args.prune}, {args.sparsity}): "
              f"{result.overall:.1%} of their weights are zero")
        for name, why in result.left_dense.items():
            print(f"  left dense: {name} ({why})")
    if args.weights is not None:
        try:
            if args.weights in GGUF_FORMATS:
                section = quantize_model_gguf(model, args.weights, args.skip)
                method = "gguf"
            else:
                section = quantize_model(model, args.weights, args.group_size, args.skip,
                                         method=method, calibration=calibration)
        except CompressionError as error:
            raise cli_error(error, QUANTIZE_FLAGS) from None
        print(f"quantised {len(section['modules'])} linear layers to {args.weights}"
              + (f" in groups of {args.group_size}" if args.group_size else
                 " per output channel") + f" ({method})")
        for name in section.get("rounded_to_nearest", []):
            print(f"  rounded to nearest: {name} (its forward never ran on the calibration "
                  "tokens)")
    if args.kv is not None:
        if not any(isinstance(m, Attention) for m in model.modules()):
            raise ValueError(f"--kv {args.kv}: the model has no softmax-attention layer, so no "
                             "KV cache")
        model.config.kv_cache = args.kv
        apply_kv_cache(model, args.kv)
        print(f"KV cache: {args.kv}")
    model = model.to(getattr(torch, args.dtype))
    after = held_out_perplexity(model, corpus, args.eval_tokens, seq_len)
    write_model_folder(model, tokenizer, Path(args.out))
    stored = weight_bytes(model)
    print(f"wrote {args.out}: weights {human_bytes(source_bytes)} -> {human_bytes(stored)} "
          f"({stored / logical_parameters(model):.3f} bytes per weight); a decode step reads "
          f"{human_bytes(decode_read_bytes(model))}")
    if before is not None:
        print(f"held-out perplexity over {before[1]:,} tokens: {before[0]:.3f} -> "
              f"{after[0]:.3f} ({after[0] / before[0] - 1:+.2%})")
    return 0


def corpus_tokens(src: str, tokenizer, max_bytes: int = CORPUS_BYTES
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(train tokens, held-out tokens) of the default corpus's first `max_bytes`, tokenised
    with the model's tokenizer (cached on disk by zoo.train.data)."""
    from zoo.train.data import (
        build_token_cache,
        default_cache_dir,
        default_corpus_files,
        subset_by_size,
    )

    files = subset_by_size(default_corpus_files(), max_bytes)
    cache = build_token_cache(files, corpus_tokenizer(src, tokenizer), VAL_FRACTION,
                              default_cache_dir(), progress=sys.stderr.isatty())
    return cache.train, cache.val


def corpus_tokenizer(src: str, tokenizer):
    """zoo.train.data's tokenizer for the model's own: the byte tokenizer as it is, a zoo
    folder's saved tokenizer files, or an imported model's tokenizer saved once under the cache
    folder, where distillation saves it (so their token caches are shared)."""
    from zoo.hf_import import is_hf_source
    from zoo.tokenizer import ByteTokenizer
    from zoo.train.data import HFTokenizer
    from zoo.train.distill.teacher import save_source_tokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer
    if not is_hf_source(src):  # a zoo folder with its tokenizer (load_for_generation)
        return HFTokenizer(Path(src))
    return HFTokenizer(Path(save_source_tokenizer(tokenizer, src)))


def calibration_windows(tokens: np.ndarray, n_tokens: int, seq_len: int) -> torch.Tensor:
    """ceil(n_tokens / seq_len) windows of seq_len tokens, spread evenly over `tokens`
    (B, seq_len); one shorter window when n_tokens < seq_len."""
    length = min(seq_len, n_tokens)
    count = math.ceil(n_tokens / length)
    if len(tokens) < length * count:
        raise ValueError(f"--calibration {n_tokens}: the corpus's training split holds "
                         f"{len(tokens):,} tokens")
    starts = np.linspace(0, len(tokens) - length, count).astype(np.int64)
    return torch.from_numpy(np.stack([np.asarray(tokens[s:s + length]) for s in starts])
                            .astype(np.int64))


def held_out_perplexity(model, corpus, n_tokens: int, seq_len: int
                        ) -> tuple[float, int] | None:
    """(perplexity, tokens scored) over consecutive held-out windows covering n_tokens, or
    None when n_tokens is 0."""
    if not n_tokens:
        return None
    from zoo.train.distill.distiller import perplexity

    val = corpus[1]
    count = min(math.ceil(n_tokens / seq_len), len(val) // seq_len)
    if count < 1:
        raise ValueError(f"--eval-tokens {n_tokens}: the held-out split holds {len(val):,} "
                         f"tokens, fewer than one window of {seq_len}")
    batches = [torch.from_numpy(np.asarray(val[i * seq_len:(i + 1) * seq_len])
                                .astype(np.int64))[None] for i in range(count)]
    result = perplexity(model, batches)
    return result["val_ppl"], result["val_tokens"]


def write_model_folder(model, tokenizer, out: Path) -> None:
    """save_pretrained (and the tokenizer, unless it is the byte-level one) into a temporary
    folder beside `out`, then renamed into place."""
    from zoo.tokenizer import ByteTokenizer

    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        if not isinstance(tokenizer, ByteTokenizer):
            tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
