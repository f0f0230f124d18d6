"""zoo.train: run configs, data, checkpoints, the training loop, and torchrun parallelism.

    zoo train RUN.yaml [--set key=value ...] [--resume]
    torchrun --nproc_per_node N -m zoo.train RUN.yaml --set strategy=ddp
    python: Trainer(load_run_config("demo")).fit()
    zoo distill RUN.yaml; python: linearize(teacher, mixer=...), Distiller(config).fit()

Nothing in zoo imports this package except the CLI.
"""

from zoo.train.checkpoint import CheckpointError
from zoo.train.config import RunConfig, RunConfigError, load_run_config, shipped_runs
from zoo.train.distill import Distiller, DistillRunConfig, load_distill_config

# `zoo.train.linearize` is the function; the module stays importable by its dotted name
from zoo.train.linearize import attention_transfer, linearize
from zoo.train.lora import LoraSpec, add_lora, merge_lora
from zoo.train.trainer import Trainer

__all__ = ["CheckpointError", "DistillRunConfig", "Distiller", "LoraSpec", "RunConfig",
           "RunConfigError", "Trainer", "add_lora", "attention_transfer", "linearize",
           "load_distill_config", "load_run_config", "merge_lora", "shipped_runs"]
