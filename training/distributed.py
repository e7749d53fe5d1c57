"""torch.distributed for data-parallel training: started by `torchrun --nproc_per_node=K scripts/train.py ...`.

Each process computes its shard of every global batch (gloo on CPU, NCCL on GPU); only process 0 writes files.
DDP (the default) keeps the whole model on every process and averages the gradients. FSDP (`--fsdp`, full
fine-tuning) keeps 1/K of every weight, gradient and Adam moment on each process and gathers one block's weights
at a time to run it. Without torchrun's environment this is one process.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    fsdp: bool = False

    @classmethod
    def from_environment(cls, device: str | torch.device = "cpu", fsdp: bool = False) -> "Distributed":
        """One process unless torchrun set WORLD_SIZE; then join the process group (each GPU process takes
        the GPU of its LOCAL_RANK)."""
        device = torch.device(device)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            if fsdp:
                raise ValueError("FSDP shards the model over several processes: start the run with torchrun "
                                 "--nproc_per_node=K (K >= 2), or drop --fsdp")
            return cls(device=device)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not torch_dist.is_initialized():
            torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(rank=torch_dist.get_rank(), world=torch_dist.get_world_size(), device=device, fsdp=fsdp)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model on this process's device, ready for data-parallel training: replicated (DDP) or sharded."""
        if self.fsdp:
            return self.shard(model)
        model = model.to(self.device)
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def shard(self, model: nn.Module) -> nn.Module:
        """fully_shard each joint block, then the root (embedders, pos_embed, final layer), in place. fully_shard
        moves each part to the device as it shards it, so no GPU ever holds the whole model."""
        if not all(p.requires_grad for p in model.parameters()):
            raise ValueError("FSDP here shards fully fine-tuned models, and this one has frozen parameters "
                             "(LoRA?): call model.requires_grad_(True), or train without FSDP")
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(self.device.type, (self.world,))
        for block in model.joint_blocks:
            fully_shard(block, mesh=mesh)
        # pos_embed is (1, tokens, D): FSDP's default dim 0 cannot be split, so it would stay whole on process 0
        return fully_shard(model, mesh=mesh, shard_placement_fn=lambda p: Shard(1) if p.shape[0] == 1 else None)

    def no_sync(self, net: nn.Module):
        """DDP: skip the gradient all-reduce on accumulation micro-steps (done once, on the last). FSDP reduces
        every micro-step: skipping it would keep every gradient whole (4 bytes a parameter) until the last."""
        return net.no_sync() if self.world > 1 and not self.fsdp else nullcontext()

    # -- whole tensors for files: FSDP gathers them from the shards, so every process must take part --------
    def gather(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole CPU copies on process 0, {} on the others."""
        whole = {}
        for name, t in tensors.items():
            t = t.detach()
            if isinstance(t, DTensor):
                t = t.full_tensor()
            if self.is_main:
                whole[name] = t.cpu().clone()
        return whole

    def place(self, whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A whole tensor as `like` holds it on this process: its FSDP shard, or all of it on like's device."""
        if isinstance(like, DTensor):
            return distribute_tensor(whole.to(like.device), like.device_mesh, like.placements)
        return whole.to(like.device)

    def optimizer_state(self, net: nn.Module, optimizer: torch.optim.Optimizer, names: list[str]) -> dict:
        """optimizer.state_dict()'s layout (state by parameter index) with whole tensors; FSDP: on process 0."""
        if not self.fsdp:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        by_name = get_optimizer_state_dict(net, optimizer,
                                           options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return _renamed(by_name, {n: i for i, n in enumerate(names)}) if self.is_main else {}

    def load_optimizer_state(self, net: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                             names: list[str]) -> None:
        if not self.fsdp:
            return optimizer.load_state_dict(state)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(net, optimizer, _renamed(state, dict(enumerate(names))),
                                 options=StateDictOptions(full_state_dict=True))

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


def _renamed(optimizer_state: dict, key: dict) -> dict:
    """An optimizer state dict with its parameter keys mapped (torch's indices <-> FSDP's parameter names)."""
    groups = optimizer_state["param_groups"]
    return {"state": {key[k]: v for k, v in optimizer_state["state"].items()},
            "param_groups": [{**g, "params": [key[k] for k in g["params"]]} for g in groups]}
