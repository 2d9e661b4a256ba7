"""Process-group setup shared by torchrun and SLURM/submitit; a single process when neither is present."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _export_slurm_env() -> None:
    """Several SLURM tasks in one job (one per GPU): derive torchrun's variables from submitit's view."""
    import submitit

    submitit.helpers.TorchDistributedEnvironment().export(overwrite=True)


def init_distributed(timeout_s: int = 600) -> DistEnv:
    """Join the process group described by the environment.

    torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR; a SLURM job with several tasks sets SLURM_NTASKS and
    SLURM_PROCID, from which the same variables are derived, so both launchers go through one ``env://`` path.
    NCCL on GPUs, gloo on the CPU. ``timeout_s`` bounds how long a rank waits for a dead peer.
    """
    if (
        "RANK" not in os.environ
        and int(os.environ.get("SLURM_NTASKS", "1")) > 1
        and "SLURM_PROCID" in os.environ
    ):
        _export_slurm_env()
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return DistEnv()
    env = DistEnv(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        kwargs = {"device_id": torch.device("cuda", env.local_rank)} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return env


def quiet_non_main(env: DistEnv) -> None:
    """Only rank 0 writes the console and train.log; other ranks keep warnings and errors on the console."""
    import logging

    if env.is_main:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
    root.setLevel(logging.WARNING)


def replicas_identical(module: torch.nn.Module) -> bool:
    """Whether every rank holds bit-identical parameters (compares a float64 checksum of each tensor)."""
    if not dist.is_initialized():
        return True
    sums = torch.stack([p.detach().double().sum() for p in module.parameters()]).cpu()
    return all(torch.equal(sums, other) for other in all_gather_object(sums))


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather_object(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
