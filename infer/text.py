"""Text in, text out for `zoo generate`: loading a model with its tokenizer, and the command.

    zoo generate attention-tiny --prompt "Hello"           # shipped config: untrained weights
    zoo generate runs/my-model --prompt "Hello" --stream   # a save_pretrained directory
    zoo generate smollm2-135m --prompt "What is 2+2?" --chat

Tokenizers: the model directory's own (transformers' AutoTokenizer) when it has one, the
imported source's for `zoo.from_hf` sources, and a byte-level one (UTF-8 bytes are the ids) for
vocabulary-256 models, which is what zoo's tiny and small configs are.
"""

from __future__ import annotations

import argparse
import codecs
import sys
import time
from pathlib import Path

import torch

from zoo.model import ZooForCausalLM

from .generate import generate


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255."""

    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).exists() for name in
               ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def load_for_generation(
    spec: str, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[ZooForCausalLM, object, str | None]:
    """(model, tokenizer, note) from a zoo directory, a from_hf source or a config name.

    The note says what the user should know (untrained weights), or is None.
    """
    from zoo.config import load_config
    from zoo.hf_import import is_hf_source

    path, note = Path(spec), None
    if is_hf_source(spec):
        from zoo.hf_import import from_hf

        model = from_hf(spec, dtype=dtype)
        tokenizer = model.tokenizer
    elif path.is_dir() and (path / "config.json").exists():
        model = ZooForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = None
        if _has_tokenizer(path):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        config = load_config(spec)
        model = ZooForCausalLM(config).to(dtype)
        tokenizer = None
        note = (f"{spec} is a config, not a checkpoint: the weights are random (untrained), "
                "so the text is noise")
    if tokenizer is None:
        if model.config.vocab_size != 256:
            raise ValueError(
                f"{spec}: no tokenizer found and vocab_size={model.config.vocab_size} is not "
                "the byte-level 256; save the tokenizer into the model directory"
            )
        tokenizer = ByteTokenizer()
    return model.to(device).eval(), tokenizer, note


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


def run_generate_command(args: argparse.Namespace) -> int:
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
    print(f"[{s.prompt_tokens} prompt tokens, {s.generated_tokens} generated "
          f"({result.finish_reasons[0]}); prefill {s.prefill_tokens_per_s:,.0f} tok/s, "
          f"decode {s.decode_tokens_per_s:,.1f} tok/s ({s.decode_ms_per_step:.2f} ms/token); "
          f"state {s.state_bytes:,} bytes]", file=sys.stderr)
    return 0
