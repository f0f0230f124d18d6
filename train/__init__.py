"""zoo.train: run configs, data, checkpoints, the training loop, and torchrun parallelism.

    zoo train RUN.yaml [--set key=value ...] [--resume]
    torchrun --nproc_per_node N -m zoo.train RUN.yaml --set strategy=ddp
    python: Trainer(load_run_config("demo")).fit()

Nothing in zoo imports this package except the CLI.
"""

from zoo.train.checkpoint import CheckpointError
from zoo.train.config import RunConfig, RunConfigError, load_run_config, shipped_runs
from zoo.train.trainer import Trainer

__all__ = ["CheckpointError", "RunConfig", "RunConfigError", "Trainer", "load_run_config",
           "shipped_runs"]
