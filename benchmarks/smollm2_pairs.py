"""SmolLM2-135M fp32, compiled decode step, paired with the read bandwidth again and again for a
while: how the ratio to the weight-read bound moves with this machine's bandwidth spells (the
2-core VM reads at ~50 or ~80 GB/s, changing from one minute to the next).

    python benchmarks/smollm2_pairs.py OUT.json [SECONDS]

Each pair is (GB/s measured just before, ms/token at 128 context, ratio to the bound). A pair
whose bandwidth was read in one spell and whose decoding ran in the other shows as an outlier
(x0.8-0.9 or x1.9-2.1); the summary splits pairs by bandwidth and gives medians.
"""

import json
import statistics
import sys
import time

import torch

from zoo.bench.decode import (
    _smollm2,
    _without_gc,
    read_bandwidth,
    weight_bytes,
    zoo_ms_per_token,
)
from zoo.bench.harness import environment

out, seconds = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 300.0
model = _smollm2(torch.float32).eval()
nbytes = weight_bytes(model)
ids = torch.randint(0, 49152, (1, 128))
zoo_ms_per_token(model, ids, 4, compile=True)  # compiles
pairs = []
start = time.time()
while time.time() - start < seconds:
    bandwidth = read_bandwidth("cpu")
    with _without_gc():
        ms, _ = zoo_ms_per_token(model, ids, 32, compile=True)
    ratio = ms / (1e3 * nbytes / bandwidth)
    pairs.append((round(bandwidth / 1e9, 1), round(ms, 2), round(ratio, 3)))
    print(pairs[-1], flush=True)
    time.sleep(4)  # spread the pairs over the spells
summary = {}
spells = (("fast (>= 70 GB/s)", lambda gb: gb >= 70), ("slow (< 70 GB/s)", lambda gb: gb < 70))
for name, keep in spells:
    chosen = [p for p in pairs if keep(p[0])]
    if chosen:
        summary[name] = {"pairs": len(chosen),
                         "median_ms": statistics.median(p[1] for p in chosen),
                         "median_x_bound": statistics.median(p[2] for p in chosen)}
print(json.dumps(summary, indent=1))
with open(out, "w") as f:
    json.dump({"environment": environment("cpu"), "weight_bytes": nbytes, "pairs": pairs,
               "summary": summary}, f, indent=1)
