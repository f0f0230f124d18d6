"""Parallelism, applied from outside: the model knows nothing of it (torchtitan's `parallelize`).

    torchrun --nproc_per_node N -m zoo.train RUN.yaml      (strategy: ddp | fsdp)

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; the process group is NCCL on CUDA and gloo on the
CPU. DDP replicates the model and averages gradients; FSDP2 (`fully_shard`) shards every block
and then the root. State dicts are gathered in full (`torch.distributed.checkpoint.state_dict`)
for rank 0 to write, and loaded in full by every rank, so a checkpoint does not depend on the
strategy or the number of ranks that wrote it.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)


@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: str = "auto") -> DistInfo:
    """Join the torchrun process group when there is one; pick this rank's device."""
    world = world_size_from_env()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but no CUDA device is available; allowed: auto, cpu")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=10)
        )
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        # Leave together: a rank that tears gloo down while another still writes the final
        # checkpoint can abort in gloo's threads ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(value: int, info: DistInfo) -> int:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.long, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def parallelize(model: nn.Module, strategy: str, info: DistInfo, compile: bool) -> nn.Module:
    """The module the training loop calls: the model compiled per block (FQNs unchanged), then
    wrapped for the strategy when there are several ranks.
    """
    if compile:
        for block in model.model.layers:
            block.compile()
    if not info.enabled or strategy == "none":
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"strategy={strategy!r} is not one of none, ddp, fsdp")


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dicts(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Unsharded model and optimizer state dicts keyed by parameter FQN (collective: every rank
    calls it; the tensors are complete on rank 0).
    """
    return (
        get_model_state_dict(model, options=FULL),
        get_optimizer_state_dict(model, optimizer, options=FULL),
    )


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return get_model_state_dict(model, options=FULL)


def load_full_state_dicts(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
) -> None:
    """Every rank passes the full dicts; FSDP keeps its own shard of each."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
