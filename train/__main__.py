"""`python -m zoo.train RUN.yaml [--set key=value ...] [--resume]`: the entry point torchrun
runs on every rank (`torchrun --nproc_per_node N -m zoo.train RUN.yaml`); the same arguments as
`zoo train`.
"""

import sys

from zoo.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
