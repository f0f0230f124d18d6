"""`python -m zoo.train RUN.yaml [--set key=value ...] [--resume]`: the entry point torchrun
runs on every rank (`torchrun --nproc_per_node N -m zoo.train RUN.yaml`); the same arguments as
`zoo train`.
"""

import os
import sys

from zoo.app.cli import main

if __name__ == "__main__":
    code = main(["train", *sys.argv[1:]])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun the run is complete here: checkpoints are written and fsynced and the
        # process group is destroyed. Interpreter finalisation can still free tensors that
        # gloo's worker threads (FSDP2's pending work handles) reference and abort with
        # "terminate called without an active exception" (an intermittent SIGABRT on the CPU);
        # leaving without finalisation avoids it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
