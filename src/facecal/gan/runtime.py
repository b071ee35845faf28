"""Where a training process runs: device, DDP rank and world, CPU threads, mixed precision;
and moving uint8 batches onto that device."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from facecal.gan.params import GanParams


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    threads: int = 1  # torch CPU threads of this process (part of the training hash)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def auto_threads(local_world: int = 1) -> int:
    """CPU threads per process for ``gan.threads: 0``: the cores this process may run on, split
    among its training processes. Never the load average: the thread count sets how every
    reduction inside a convolution is split, so it changes the weights (1 and 2 threads give
    different models), and a training must not depend on what else the machine was doing."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, local_world))


def resolve_threads(params: GanParams, local_world: int | None = None) -> int:
    """The thread count a run uses (and its checkpoint hash records)."""
    if local_world is None:
        world = os.environ.get("WORLD_SIZE", "1")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return params.threads or auto_threads(local_world)


def setup_runtime(params: GanParams) -> Runtime:
    """Device, DDP process group (under torchrun), threads and AMP."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank % torch.cuda.device_count()}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    threads = resolve_threads(params, local_world)
    torch.set_num_threads(threads)
    amp_dtype = None
    if cuda and params.amp != "off":
        if params.amp == "fp16" or (params.amp == "auto" and not torch.cuda.is_bf16_supported()):
            amp_dtype = torch.float16
        else:
            amp_dtype = torch.bfloat16
    return Runtime(
        device, rank, world, local_rank, amp_dtype, cuda and params.channels_last, threads
    )


def to_model(batch: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """uint8 (B, C, H, W) → float in [−1, 1] on the device."""
    x = batch.to(rt.device, non_blocking=True).float().div_(127.5).sub_(1.0)
    return x.contiguous(memory_format=torch.channels_last) if rt.channels_last else x
