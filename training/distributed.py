"""torch.distributed for data-parallel training: started by `torchrun --nproc_per_node=K scripts/train.py ...`.

Each process holds the whole model, computes its shard of every global batch, and DDP averages the gradients
(gloo on CPU, NCCL on GPU); only process 0 writes files. Without torchrun's environment this is one process.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_environment(cls, device: str | torch.device = "cpu") -> "Distributed":
        """One process unless torchrun set WORLD_SIZE; then join the process group (each GPU process takes
        the GPU of its LOCAL_RANK)."""
        device = torch.device(device)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(device=device)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not torch_dist.is_initialized():
            torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(rank=torch_dist.get_rank(), world=torch_dist.get_world_size(), device=device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def no_sync(self, net: nn.Module):
        """Skip the gradient all-reduce on accumulation micro-steps (done once, on the last)."""
        return net.no_sync() if self.world > 1 else nullcontext()

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        torch_dist.all_reduce(t)
        return t.item() / self.world

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()

    def close(self) -> None:
        if self.world > 1 and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
