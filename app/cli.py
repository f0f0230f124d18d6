"""The `zoo` command: one subcommand per job, each a small function over the library.

    zoo info CONFIG            parameters, layers, state bytes per sequence, weight bytes
    zoo bench NAME             run a registered benchmark (zoo bench --list)
    zoo generate MODEL --prompt TEXT   generate text (zoo.infer), --stream to print as it comes
    zoo train RUN              train from a run config (zoo train --list; --plot RUN_DIR)
    zoo distill RUN            distil a teacher into a student (linearise, transfer, KD)
    zoo compress SRC OUT       quantise (int8, int4) and / or prune (magnitude, wanda) a model
    zoo serve MODEL            an OpenAI-compatible HTTP server (continuous batching)

Subcommands live in COMMANDS: (name, help, add_arguments, run).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

COMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable]] = []


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    def add(run: Callable[[argparse.Namespace], int | None]):
        COMMANDS.append((name, help, add_arguments, run))
        return run

    return add


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def runs_of(lines: list[str]) -> list[tuple[int, int, str]]:
    """Consecutive equal lines as (first index, last index, line)."""
    runs: list[tuple[int, int, str]] = []
    for i, line in enumerate(lines):
        if runs and runs[-1][2] == line:
            runs[-1] = (runs[-1][0], i, line)
        else:
            runs.append((i, i, line))
    return runs


def model_info(config, dtype: torch.dtype = torch.float32) -> dict:
    """Parameters (of the float model a quantised one stands for), per-layer mixer/FFN, state
    bytes per sequence at 1k, 8k and 64k tokens, and the weights' bytes: all of them, and what
    one decode step reads (float tensors counted in `dtype`)."""
    from zoo.compression import decode_read_bytes, logical_parameters, weight_bytes
    from zoo.model import ZooForCausalLM

    with torch.device("meta"):
        model = ZooForCausalLM(config)
    params = logical_parameters(model)
    embedding = model.model.embed_tokens.weight.numel()
    state = {}
    for seq_len in (1024, 8192, 65536):
        total = 0
        for block in model.model.layers:
            total += block.mixer.state_size(seq_len, dtype)
            if block.ffn is not None:
                total += block.ffn.state_size(seq_len, dtype)
        state[seq_len] = total
    return {
        "parameters": params,
        "non_embedding_parameters": params - embedding,
        "layers": config.describe_layers(),
        "state_bytes": state,
        "weight_bytes": weight_bytes(model, dtype),
        "decode_read_bytes": decode_read_bytes(model, dtype),
    }


def _info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a shipped config name, a YAML path or a model directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def resolve_config(name: str):
    """A shipped config name, a YAML file, or a save_pretrained directory (whose weight files
    are checked whole: a folder without weights or with a truncated file is an error here)."""
    from zoo.config import ZooConfig, load_config
    from zoo.hf_import import convert_config, is_hf_source, load_hf_config
    from zoo.model import check_model_folder

    if is_hf_source(name):
        return convert_config(load_hf_config(name))[0]
    path = Path(name)
    if path.is_dir():
        check_model_folder(path)
        return ZooConfig.from_pretrained(path)
    return load_config(name)


@command("info", "parameters, layers and state bytes per sequence of a config", _info_arguments)
def run_info(args: argparse.Namespace) -> int:
    config = resolve_config(args.config)
    info = model_info(config, getattr(torch, args.dtype))
    print(f"config: {args.config}")
    print(f"vocab_size {config.vocab_size}, d_model {config.d_model}, n_layers {config.n_layers}")
    print(f"parameters: {info['parameters']:,} ({info['non_embedding_parameters']:,} "
          "without the embedding)")
    print("layers:")
    for first, last, line in runs_of(info["layers"]):
        span = f"{first}" if first == last else f"{first}-{last}"
        print(f"  {span:>7s}  {line}")
    print(f"state per sequence ({args.dtype}):")
    for seq_len, nbytes in info["state_bytes"].items():
        print(f"  {seq_len // 1024:3d}k tokens: {human_bytes(nbytes)}")
    quantization = config.quantization
    stored = (f"{args.dtype}" if quantization is None else
              f"{len(quantization['modules'])} linear layers {describe_weights(quantization)}, "
              f"the rest {args.dtype}")
    print(f"weights: {human_bytes(info['weight_bytes'])}, "
          f"{info['weight_bytes'] / info['parameters']:.3f} bytes per weight ({stored})")
    print(f"a decode step reads {human_bytes(info['decode_read_bytes'])} of weights (each once; "
          "an embedding table not shared with the head, one row)")
    return 0


def describe_weights(quantization: dict) -> str:
    """'int4 in groups of 32 (rtn)' for a config's quantization section."""
    grouping = ("per output channel" if quantization["group_size"] is None
                else f"in groups of {quantization['group_size']}")
    return f"{quantization['weights']} {grouping} ({quantization['method']})"


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="benchmark name (see --list)")
    p.add_argument("--list", action="store_true", help="list the registered benchmarks")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="smallest sizes only")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=600.0, help="wall-time budget")
    p.add_argument("--out", default="runs/bench", help="directory for JSON and PNG")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--only", default="", metavar="NAME,...",
                   help="only these families (benches that have them: complexity, mqar)")


@command("bench", "run a registered benchmark; JSON (+PNG) with the device", _bench_arguments)
def run_bench_command(args: argparse.Namespace) -> int:
    from zoo.app.bench import BENCHES, BenchOptions, format_rows, load_entries, run_bench

    load_entries()
    if args.list or not args.name:
        for name, entry in sorted(BENCHES.items()):
            print(f"{name:28s} {entry.help}")
        return 0
    options = BenchOptions(device=args.device, quick=args.quick, repeats=args.repeats,
                           budget_s=args.budget_s, out_dir=Path(args.out),
                           only=tuple(name for name in args.only.split(",") if name))
    record = run_bench(args.name, options, plot=not args.no_plot)
    env = record["environment"]
    print(f"{args.name} on {env['device']} (torch {env['torch']}, commit {env['commit']})")
    print(record.get("report") or format_rows(record["rows"]))
    print(f"wrote {record['json']}" + (f" and {record['png']}" if record.get("png") else ""))
    return 0


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    from zoo.app.generate import add_generate_arguments

    add_generate_arguments(p)


@command("generate", "generate text from a checkpoint, a config (untrained) or smollm2-135m",
         _generate_arguments)
def run_generate(args: argparse.Namespace) -> int:
    from zoo.app.generate import run_generate_command

    return run_generate_command(args)


def _convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="a transformers directory, a GGUF file or a short name "
                   "(smollm2-135m)")
    p.add_argument("out", help="the zoo save_pretrained directory to write")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


@command("convert", "import a transformers checkpoint as a zoo model directory", _convert_arguments)
def run_convert(args: argparse.Namespace) -> int:
    from zoo.hf_import import from_hf

    model = from_hf(args.src, dtype=getattr(torch, args.dtype))
    model.save_pretrained(args.out)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out}: {model.config.n_layers} layers, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, "
          f"tokenizer {'saved' if model.tokenizer is not None else 'absent'}")
    return 0


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_config", nargs="?", metavar="RUN",
                   help="a run config: a YAML path or a shipped run name")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run-config field, dotted for nesting (train.steps=100)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest intact checkpoint in out_dir (from step 0 when "
                   "the run stopped before its first)")
    p.add_argument("--resume-from", metavar="CHECKPOINT",
                   help="continue from this checkpoint folder (out_dir/checkpoints/step_...)")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in an out_dir zoo made, deleting only zoo's outputs there")
    p.add_argument("--plot", metavar="RUN_DIR", help="only draw RUN_DIR/loss.png from its metrics")
    p.add_argument("--list", action="store_true", help="list the shipped run configs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--sample", type=int, default=200, metavar="N",
                   help="text runs: generate N tokens from the final weights (0: none)")
    p.add_argument("--prompt", default="def ", help="the prompt of that sample")


@command("train", "train a model from a run config; checkpoints, metrics, loss curves",
         _train_arguments)
def run_train(args: argparse.Namespace) -> int:
    import signal

    if args.plot:
        from zoo.train.metrics import plot_losses

        print(f"wrote {plot_losses(Path(args.plot))}")
        return 0
    from zoo.train import CheckpointError, Trainer, load_run_config, shipped_runs
    from zoo.train.distributed import world_size_from_env

    if args.list or not args.run_config:
        print("shipped run configs (zoo train NAME):", ", ".join(shipped_runs()))
        return 0 if args.list else 2
    run = load_run_config(args.run_config, args.set, world_size=world_size_from_env())
    try:
        trainer = Trainer(run, resume=args.resume_from or args.resume, overwrite=args.overwrite,
                          progress=not args.no_progress)
        try:
            summary = trainer.fit()
        finally:
            trainer.close()
    except CheckpointError as error:
        print(f"zoo train: error: {error}", file=sys.stderr)
        return 2
    if summary["interrupted"]:
        return 128 + signal.Signals[summary["interrupted"]].value
    if trainer.dist.is_main:
        shown = {k: summary[k] for k in ("val_loss", "val_ppl", "val_accuracy") if k in summary}
        print(f"done: step {summary['step']} in {summary['seconds']:.0f} s; "
              + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
        print(f"final weights: {summary['final']} (AutoModelForCausalLM.from_pretrained)")
        print(f"metrics: {summary['out_dir']}/metrics.jsonl; loss curves: {summary['plot']}")
        if args.sample > 0 and trainer.tokenizer is not None:
            text = sample_text(summary["final"], trainer.tokenizer, args.prompt, args.sample)
            print(f"--- {args.sample} tokens sampled (greedy, recurrent cache) after "
                  f"{args.prompt!r}:\n{text}")
    return 0


def sample_text(model_dir: Path, tokenizer, prompt: str, n_tokens: int) -> str:
    """Greedy continuation of `prompt` by the save_pretrained model in `model_dir`, decoded
    token by token through the model's recurrent cache (`generate`)."""
    from transformers import AutoModelForCausalLM

    import zoo  # noqa: F401  (registers the zoo model type)

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n_tokens, do_sample=False)
    return tokenizer.decode(out[0].tolist())


def _distill_arguments(p: argparse.ArgumentParser) -> None:
    # dest must not be "run": set_defaults(run=...) holds the subcommand's function
    p.add_argument("run_config", metavar="RUN",
                   help="a distillation run config: a YAML path or a shipped run name")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run-config field, dotted (distill.temperature=1.5)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest intact checkpoint in out_dir (from the "
                   "start when the run stopped before its first)")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in an out_dir zoo made, deleting only zoo's outputs there")
    p.add_argument("--report", metavar="STEM",
                   help="also time decoding and write STEM.md / .json / .png")
    p.add_argument("--contexts", default="128,8192",
                   help="decode contexts for --report (comma-separated tokens)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


@command("distill", "distil a teacher into a zoo student (linearise, attention transfer, KD)",
         _distill_arguments)
def run_distill(args: argparse.Namespace) -> int:
    import signal

    from zoo.app.distill_report import distill_cli
    from zoo.train import CheckpointError

    contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    try:
        summary = distill_cli(args.run_config, args.set, resume=args.resume,
                              overwrite=args.overwrite, progress=not args.no_progress,
                              report=args.report, contexts=contexts)
    except CheckpointError as error:
        print(f"zoo distill: error: {error}", file=sys.stderr)
        return 2
    if summary["interrupted"]:
        return 128 + signal.Signals[summary["interrupted"]].value
    print(f"done in {summary['seconds']:.0f} s: teacher ppl {summary['teacher_val_ppl']:.3f}, "
          f"student ppl {summary['student_val_ppl']:.3f} "
          f"({summary['student_val_ppl'] / summary['teacher_val_ppl']:.2f}x) on "
          f"{summary['val_tokens']:,} held-out tokens; {summary['tokens_seen']:,} tokens seen")
    print(f"final weights: {summary['final']}; curves: {summary['plot']}")
    if "report" in summary:
        print(f"report: {summary['report']['md']}")
    return 0


def _compress_arguments(p: argparse.ArgumentParser) -> None:
    from zoo.app.compress import add_compress_arguments

    add_compress_arguments(p)


@command("compress", "quantise (int8, int4) and / or prune (magnitude, wanda) a model into a "
         "new model folder", _compress_arguments)
def run_compress(args: argparse.Namespace) -> int:
    from zoo.app.compress import run_compress_command

    return run_compress_command(args)


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    from zoo.app.serve import add_serve_arguments

    add_serve_arguments(p)


@command("serve", "an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, "
         "streaming) over the continuous-batching engine", _serve_arguments)
def run_serve(args: argparse.Namespace) -> int:
    from zoo.app.serve import run_serve_command

    return run_serve_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help, add_arguments, run in COMMANDS:
        p = sub.add_parser(name, help=help, description=help)
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, TypeError, OSError) as error:
        # OSError: files that cannot be read (a config.json that is not JSON, a folder where
        # a file was expected); each such error names its file
        print(f"zoo {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2


def one_line(error: BaseException) -> str:
    """The error's message on one line (some libraries' messages span several)."""
    return " ".join(str(error).split()) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
