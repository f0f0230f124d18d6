"""SmolLM2-135M fp32 decode steps, each paired with the read bandwidth measured just before it,
again and again for a while: how the ratio to the weight-read bound moves with this machine's
bandwidth spells (the 2-core VM reads at ~50 or ~80 GB/s, changing from one minute to the next).
The steps take turns, so every step sees the same mix of spells:

    python -m zoo.app.bench.smollm2_pairs OUT.json [SECONDS] [STEPS]

STEPS: comma-separated `generate(compile=...)` modes, default "native,inductor". Each pair is
(GB/s, ms/token at 128 context, ratio to the bound). A pair whose bandwidth was read in one
spell and whose decoding ran in the other shows as an outlier (x0.8-0.9 or x1.9-2.1); the
summary splits pairs by bandwidth and gives medians per step.
"""

import json
import statistics
import sys
import time

import torch

from zoo.app.bench.decode import load_smollm2
from zoo.app.bench.harness import environment
from zoo.app.decode_timer import read_bandwidth, time_decode, weight_bytes

out = sys.argv[1]
seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 300.0
steps = sys.argv[3].split(",") if len(sys.argv) > 3 else ["native", "inductor"]
model = load_smollm2(torch.float32).eval()
nbytes = weight_bytes(model)
ids = torch.randint(0, 49152, (1, 128))
for step in steps:
    time_decode(model, ids, 4, compile=step)  # compiles (inductor) or builds (native)
pairs = {step: [] for step in steps}
start = time.time()
while time.time() - start < seconds:
    for step in steps:
        bandwidth = read_bandwidth("cpu")
        ms = time_decode(model, ids, 32, compile=step).ms_per_token
        ratio = ms / (1e3 * nbytes / bandwidth)
        pairs[step].append((round(bandwidth / 1e9, 1), round(ms, 2), round(ratio, 3)))
        print(step, pairs[step][-1], flush=True)
    time.sleep(2)  # spread the pairs over the spells
summary = {}
spells = (("fast (>= 70 GB/s)", lambda gb: gb >= 70), ("slow (< 70 GB/s)", lambda gb: gb < 70))
for step in steps:
    for name, keep in spells:
        chosen = [p for p in pairs[step] if keep(p[0])]
        if chosen:
            summary[f"{step}, {name}"] = {
                "pairs": len(chosen), "median_ms": statistics.median(p[1] for p in chosen),
                "median_x_bound": statistics.median(p[2] for p in chosen)}
print(json.dumps(summary, indent=1))
with open(out, "w") as f:
    json.dump({"environment": environment("cpu"), "weight_bytes": nbytes, "steps": steps,
               "pairs": pairs, "summary": summary}, f, indent=1)
