"""Where and how training runs: device, torch.distributed (torchrun), precision, seeding."""

from __future__ import annotations

import logging
import os
import random
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """The process's place in a (possibly distributed) run."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks the GPU when there is one (the local rank's under torchrun), else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but no CUDA GPU is available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    return dev


def init_runtime(device: str = "auto") -> Runtime:
    """Join the process group when started by torchrun (RANK/WORLD_SIZE set): nccl on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Runtime(device=resolve_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
        logger.info("joined %s process group: rank %d of %d on %s", backend, rank, world, dev)
    return Runtime(device=dev, rank=rank, world_size=world, local_rank=local_rank)


def shutdown_runtime(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over all ranks (``x`` itself in one process), detached.

    A loss normalized by a count (masked tokens, masked voxels) divides by this mean count, not its own: DDP's
    averaging of the ranks' gradients then gives exactly the gradient of one process on the global batch.
    """
    x = x.detach()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    y = x.clone()
    dist.all_reduce(y)
    return y / dist.get_world_size()


def seed_everything(seed: int) -> None:
    """One seed fixes python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full fp32.

    ``auto``: bf16 on GPUs that support it, else fp16; fp32 on the CPU (bf16 autocast on a CPU without
    bf16 matrix units is slower than fp32; ask for ``bf16`` explicitly where it helps).
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError("precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last order: ``channels_last_3d`` for a 5-D tensor (volumes, 3D kernels), ``channels_last``
    for a 4-D one, unchanged otherwise. Same values, another stride order (what oneDNN and cuDNN convolutions
    prefer)."""
    if x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


@torch.no_grad()
def to_channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """Every 4-D and 5-D parameter and buffer of ``module`` (convolution kernels) in channels-last order, in place;
    before the optimizer is made, so its state follows."""
    for t in [*module.parameters(), *module.buffers()]:
        if t.dim() in (4, 5):
            t.data = channels_last(t.data)
    return module
