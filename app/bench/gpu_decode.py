"""On a CUDA machine: the compiled decode loop against eager
decoding, token for token, and `zoo bench decode` for a few tiny configs on the GPU.

    python3 -m zoo.app.bench.gpu_decode OUT_DIR [CONFIG ...]
"""

import sys
from pathlib import Path

import torch

import zoo.app.bench.decode as decode_bench
from zoo.app.bench import BenchOptions, load_entries, run_bench
from zoo.config import load_config
from zoo.infer.generate import generate
from zoo.model import ZooForCausalLM

out = Path(sys.argv[1])
configs = sys.argv[2:] or ["attention-tiny", "mamba-tiny", "mamba2-tiny", "rwkv4-tiny",
                           "mixtral-tiny"]
for name in configs:
    torch.manual_seed(0)
    model = ZooForCausalLM(load_config(name)).cuda().eval()
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (37, 300, 5)]
    eager = generate(model, prompts, max_new_tokens=48).tokens
    compiled = generate(model, prompts, max_new_tokens=48, compile=True).tokens
    again = generate(model, prompts, max_new_tokens=48, compile=True).tokens  # graph replays
    print(f"{name}: compiled greedy == eager: {compiled == eager and again == eager}",
          flush=True)
load_entries()
decode_bench._tiny_configs = lambda: configs
rows = run_bench("decode", BenchOptions(device="cuda", repeats=3, out_dir=out))["rows"]
