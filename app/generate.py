"""`zoo generate`: text in, text out through zoo.infer's recurrent loop.

    zoo generate attention-tiny --prompt "Hello"           # shipped config: untrained weights
    zoo generate runs/my-model --prompt "Hello" --stream   # a save_pretrained directory
    zoo generate smollm2-135m --prompt "What is 2+2?" --chat
"""

from __future__ import annotations

import argparse
import codecs
import math
import sys
import time

import torch

from zoo.app.decode_timer import weight_bytes
from zoo.infer import generate
from zoo.infer.sampling import SamplingConfig
from zoo.infer.text import ByteTokenizer, load_for_generation, resolve_device


class _TextStream:
    """Decode a growing list of ids into the text not yet printed."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], ""
        self.bytes = codecs.getincrementaldecoder("utf-8")(errors="replace") if isinstance(
            tokenizer, ByteTokenizer) else None

    def push(self, token: int) -> str:
        if self.bytes is not None:
            return self.bytes.decode(bytes([token]))
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        # a partial multi-byte character decodes to U+FFFD until its last piece arrives
        if text.endswith("\ufffd"):
            return ""
        new, self.printed = text[len(self.printed):], text
        return new


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a save_pretrained directory, a shipped config name "
                   "(untrained weights), a transformers directory / GGUF file, or smollm2-135m")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the tokenizer's chat template (instruct models)")
    p.add_argument("--stream", action="store_true", help="print tokens as they come")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true",
                   help="a compiled decode step: zoo's native C++ step on the CPU for attention "
                   "stacks with SwiGLU/GELU FFNs (Llama, SmolLM2), torch.compile otherwise")


def check_request(args: argparse.Namespace) -> None:
    """The request's options, each named when it is wrong, before anything is loaded."""
    for flag in ("temperature", "top_p", "repetition_penalty"):
        value = getattr(args, flag)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"--{flag.replace('_', '-')}={value} must be a finite number")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    SamplingConfig(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    resolve_device(args.device)


def run_generate_command(args: argparse.Namespace) -> int:
    check_request(args)
    model, tokenizer, note = load_for_generation(args.model, getattr(torch, args.dtype),
                                                 args.device)
    if note:
        print(f"note: {note}", file=sys.stderr)
    if args.chat:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"--chat: the tokenizer of {args.model} has no chat template")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                            add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    else:
        ids = tokenizer.encode(args.prompt)
    stops = [t for t in (model.config.eos_token_id, tokenizer.eos_token_id) if t is not None]
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p,
                  repetition_penalty=args.repetition_penalty, seed=args.seed,
                  stop_tokens=sorted(set(stops)), compile=args.compile)
    if args.compile:
        # Compile (or build the native step) before the timed run, on the same shapes (a few
        # steps of the same request), so the speed printed below is decoding's.
        start = time.perf_counter()
        for _ in zip(range(4), generate(model, [ids], stream=True, **kwargs)):
            pass
        print(f"note: compiled the decode step in {time.perf_counter() - start:.1f} s",
              file=sys.stderr)
    if args.stream:
        run = generate(model, [ids], stream=True, **kwargs)
        text = _TextStream(tokenizer)
        if not args.chat:
            print(args.prompt, end="", flush=True)
        for _, token in run:
            print(text.push(token), end="", flush=True)
        print()
        result = run.result
    else:
        result = generate(model, [ids], **kwargs)
        out = tokenizer.decode(result.tokens[0], **(
            {} if isinstance(tokenizer, ByteTokenizer) else {"skip_special_tokens": True}))
        print(out if args.chat else args.prompt + out)
    s = result.stats
    # a step reads every weight and the state once: the bandwidth that takes, as gpt-fast prints
    read_per_step = weight_bytes(model) + s.state_bytes
    print(f"[{s.prompt_tokens} prompt tokens, {s.generated_tokens} generated "
          f"({result.finish_reasons[0]}); prefill {s.prefill_tokens_per_s:,.0f} tok/s, "
          f"decode {s.decode_tokens_per_s:,.1f} tok/s ({s.decode_ms_per_step:.2f} ms/token, "
          f"{read_per_step / max(s.decode_ms_per_step, 1e-9) / 1e6:,.1f} GB/s); "
          f"state {s.state_bytes:,} bytes]", file=sys.stderr)
    return 0
