"""torchrun support: process group from the environment, rank-0-only writes, reductions, barriers.

`torchrun --nproc_per_node=N -m roli.train ...` sets RANK/WORLD_SIZE/LOCAL_RANK; roli then uses gloo on
CPU and nccl on GPU. Without torchrun every helper is a no-op for a world of one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from roli import _env


def init_from_env(device: str) -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun."""
    world = _env.world_size()
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(torch.device(local_device(device)))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def local_device(device: str) -> str:
    """This process's device: under torchrun a CUDA device is the rank's own GPU (cuda:LOCAL_RANK), whatever
    index was given (`--device cuda:0` would put every rank on GPU 0)."""
    if _env.world_size() > 1 and str(device).startswith("cuda"):
        return f"cuda:{_env.local_rank()}"
    return device


def shard(n: int) -> range:
    """The indices of n work items (batches) this rank takes: every world-th, starting at its rank."""
    return range(rank(), n, world())


def sum_flags(flags: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks of an integer tensor (each rank fills its own examples, zeros elsewhere)."""
    if not active():
        return flags
    t = flags.to(device=collective_device(), dtype=torch.int64)
    dist.all_reduce(t)
    return t.to(flags.device)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def collective_device() -> torch.device:
    """Where a collective's tensors must live: the current GPU for NCCL (it refuses CPU tensors), else CPU."""
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank_world() -> tuple[int, int]:
    """(rank, world size) of an initialised process group of any size, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sum_(*values: float) -> list[float]:
    """Element-wise sum over ranks (float64), on the process group's device."""
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    if active():
        dist.all_reduce(t)
    return t.cpu().tolist()


def any_(flag: bool) -> bool:
    return sum_(float(flag))[0] > 0 if active() else flag


def gather_objects(obj) -> list:
    if not active():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def average_grads(params) -> None:
    """All-reduce-average the gradients of `params` (for updates done outside a DDP forward, e.g. ALP's head)."""
    if not active():
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world())


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
