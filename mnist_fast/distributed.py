"""Multi-process runs of mnist_fast.train.

Multi-process: under torchrun (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel
(gloo on CPU, nccl on CUDA); each rank trains on its shard of every shuffled epoch with
--batch-size samples per step; rank 0 alone evaluates, prints and writes files.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Distributed", "init_distributed", "resolve_device"]


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init_distributed(device_choice: str) -> Distributed:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    env = Distributed(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return env


def resolve_device(choice: str, env: Distributed) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")
