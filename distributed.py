"""One process or many: the same scripts run under `python` and under `torchrun` (gloo on CPU, nccl on CUDA).

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; plain `python` runs a single process with no process group, and
every collective in the project is guarded by `dist.is_initialized()`.

    rank, world, device = init()      # train.py, eval_knn.py, eval_linear.py
    ...
    cleanup()

`init` also calls `keep_freed_memory`: on Linux, glibc's malloc hands every large block (a tensor of more than
128 KB to 32 MB, by a sliding threshold) back to the kernel when it is freed, and the next tensor of that size
page-faults its memory in again, zeroed. A training step frees and re-allocates the same tensors every iteration,
so on CPU it spends part of its time in those faults (2-core Xeon: 70,000-90,000 faults per ViT-S step, the step
5-10% slower; lab/notes/speed.md). Keeping freed memory in the process is what the jemalloc or tcmalloc of PyTorch's
CPU tuning guide achieve; glibc's own `mallopt` does it without a new package.
"""
import ctypes
import ctypes.util
import datetime
import os

import torch
import torch.distributed as dist


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def keep_freed_memory():
    """Ask glibc to keep freed memory for reuse instead of returning it to the kernel (Linux; elsewhere nothing).
    Returns True if it took effect. Loader workers started after this (fork) inherit it."""
    try:
        libc = _libc()
        m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
        big = 2 ** 31 - 1  # 2 GB: blocks below it come from the heap, and the heap is never trimmed below it
        ok = libc.mallopt(m_mmap_threshold, big) or libc.mallopt(m_mmap_threshold, 32 * 2 ** 20)  # older glibc: 32 MB
        return bool(ok and libc.mallopt(m_trim_threshold, big))
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False


def release_freed_memory():
    """Hand what glibc keeps back to the kernel now (benchmark.py, before it measures a peak); elsewhere nothing."""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass


def init():
    """Join the process group when launched by torchrun (WORLD_SIZE > 1). Returns (rank, world size, device)."""
    keep_freed_memory()
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
