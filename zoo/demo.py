"""`make demo`: every shipped tiny config, its `zoo info`, and a few tokens from each through the
recurrent cache. The weights are untrained (random): the point is that every mixer builds,
decodes token by token and equals its own full forward.
"""

from __future__ import annotations

import time

import torch

import zoo
from zoo.cli import human_bytes, model_info


def main() -> None:
    torch.manual_seed(0)
    names = [n for n in zoo.shipped_configs() if n.endswith("-tiny")]
    print(f"zoo {zoo.__version__}: {len(names)} tiny configs (UNTRAINED random weights)\n")
    prompt = torch.tensor([list(b"def main():")])
    for name in names:
        config = zoo.load_config(name)
        info = model_info(config)
        model = zoo.ZooForCausalLM(config).eval()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt % config.vocab_size, max_new_tokens=16, do_sample=False)
        seconds = time.perf_counter() - start
        print(f"{name:24s} {info['parameters']:>9,} params  "
              f"state@8k {human_bytes(info['state_bytes'][8192]):>10s}  "
              f"{', '.join(sorted(set(info['layers'])))}")
        print(f"{'':24s} 16 tokens in {seconds * 1e3:.0f} ms: {out[0, prompt.shape[1]:].tolist()}")
    print("\nThe weights above are random; `zoo train` trains them (see README).")


if __name__ == "__main__":
    main()
