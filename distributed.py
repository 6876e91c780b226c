"""One process or many: the same scripts run under `python` and under `torchrun` (gloo on CPU, nccl on CUDA).

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; plain `python` runs a single process with no process group, and
every collective in the project is guarded by `dist.is_initialized()`.

    rank, world, device = init()      # train.py, eval_knn.py, eval_linear.py
    ...
    cleanup()
"""
import datetime
import os

import torch
import torch.distributed as dist


def init():
    """Join the process group when launched by torchrun (WORLD_SIZE > 1). Returns (rank, world size, device)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))  # a dead rank fails the others, not hangs
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def cleanup():
    """Leave the process group (all processes together), if there is one."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_gather(t):
    """(b, ...) on each process -> (world·b, ...) on every process (a DistributedSampler makes all b equal)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)  # (world*b, ...)
