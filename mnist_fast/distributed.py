"""Multi-process runs of mnist_fast.train.

Multi-process: under torchrun (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel
(gloo on CPU, nccl on CUDA); with --backend fused-step, FusedTrainer does DDP's part instead (rank
0's parameters broadcast at the start, the gradients averaged by one all-reduce per step, between
the fused backward and the update). Each rank trains on its shard of every shuffled epoch with
--batch-size samples per step; rank 0 alone evaluates, prints and writes files.

A process that waits at a collective (the gradient all-reduce, a barrier) for longer than
`--ddp-timeout` seconds fails instead of waiting torch's default 30 minutes for a stuck peer.
The default, 300 s, is far above the longest legitimate wait of this workload: the other ranks wait
while rank 0 scores an epoch and writes its files (about a second), compiles (--compile: a minute on
a slow CPU) or finds the data set; raise it when the first run downloads the data over a slow link.
"""
import datetime
import os
import re
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["DEFAULT_DDP_TIMEOUT_S", "Distributed", "init_distributed", "resolve_device", "collective_failure",
           "trainer_world_size", "broadcast_from_rank_0"]

DEFAULT_DDP_TIMEOUT_S = 300.0


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init_distributed(device_choice: str, timeout_s: float = DEFAULT_DDP_TIMEOUT_S) -> Distributed:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    env = Distributed(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return env


def resolve_device(choice: str, env: Distributed) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def collective_failure(error: BaseException) -> Optional[str]:
    """One line saying why a collective failed (a peer stuck past the timeout, or gone), or None when error
    is something else. Gloo raises a plain RuntimeError whose text starts with its source path."""
    text = str(error).strip()
    if not (isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and "/gloo/" in text)):
        return None
    first = text.splitlines()[0] if text else type(error).__name__
    return re.sub(r"^\[[^\]]*\]\s*", "", first)  # drop the "[.../gloo/...cc:78]" prefix


# ---- FusedTrainer's own gradient averaging (mnist_fast.trainer) ----

def trainer_world_size(distributed: Optional[bool]) -> int:
    """The number of processes whose gradients the trainer averages (1: none)."""
    if distributed is False:
        return 1
    initialized = dist.is_available() and dist.is_initialized()
    if distributed and not initialized:
        raise ValueError("FusedTrainer(distributed=True) needs torch.distributed initialized first "
                         "(torch.distributed.init_process_group, as under torchrun)")
    return dist.get_world_size() if initialized else 1


@torch.no_grad()
def broadcast_from_rank_0(params: List[Tensor]) -> None:
    """Rank 0's parameters on every process, in one collective (DistributedDataParallel's start)."""
    flat = torch.cat([p.reshape(-1) for p in params])
    dist.broadcast(flat, 0)
    for p, value in zip(params, flat.split([p.numel() for p in params])):
        p.copy_(value.view(p.shape))
