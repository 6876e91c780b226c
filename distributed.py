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

Many processes make a large global batch; `LARS` is the optimizer the official code offers for it (--optimizer lars
in train.py, with convnets): the layer-wise trust ratio of You et al. (2017) rescales each weight's update to a fixed
fraction of its norm, whatever the batch size does to the gradient's.
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


class LARS(torch.optim.Optimizer):
    """The official utils.LARS: momentum SGD on u = q (g + wd p), with the trust ratio q = eta ‖p‖ / ‖g + wd p‖
    (1 where a norm is 0); a 1-D parameter (bias, norm) gets u = g: no weight decay, no trust ratio. `lr` and
    `weight_decay` are set per step by train.py's schedules, as for AdamW."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in [p for p in g["params"] if p.grad is not None]:
                u = p.grad
                if p.ndim != 1:  # u = q (g + wd p), q computed on the device (no host sync)
                    u = u.add(p, alpha=g["weight_decay"])
                    p_norm, u_norm = p.norm(), u.norm()
                    u = u * torch.where((p_norm > 0) & (u_norm > 0), g["eta"] * p_norm / u_norm, 1.0)
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(g["momentum"]).add_(u)  # μ ← m μ + u
                p.add_(mu, alpha=-g["lr"])  # p ← p − lr μ


def all_gather(t):
    """(b, ...) on each process -> (world·b, ...) on every process (a DistributedSampler makes all b equal)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)  # (world*b, ...)
