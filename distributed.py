"""One process or many, stopped and started again: the same scripts run under `python` and under `torchrun` (gloo on
CPU, nccl on CUDA), and a long run survives Ctrl-C, a cluster's SIGTERM, kill -9 and a full disk.

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

A training run (train.py) lives in OUT/checkpoint.pth and OUT/log.txt, written by the first process only:

    it, history, sums = resume(output_dir, parts, args, niter_per_ep, rank)   # where a stopped run was, if anywhere
    save_run(training_state(parts, it, niter_per_ep, args, history, None), output_dir, rank)   # each epoch's end

log.txt is only ever the history that checkpoint.pth holds, so the two agree after any crash; a file that cannot be
written stops the run with one line (UserError, exit code 2); SIGINT/SIGTERM save at the next step boundary and
exit 128 + the signal's number (`catch_stop_signals`, `stop_requested`, `save_and_exit`).
"""
import contextlib
import ctypes
import ctypes.util
import datetime
import errno
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

import checkpoint


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


def print_once(rank, *message, **kw):
    """print on the first process only (the others run the same code silently)."""
    if rank == 0:
        print(*message, **kw)


def loader_workers(asked, rank):
    """--num_workers, at most the CPUs this process may use (more would only compete for them: torch warns that
    the machine may freeze); says so in one line when it lowers it."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if asked <= cpus:
        return asked
    print_once(rank, f"--num_workers {asked} is more than the {cpus} CPUs this process may use: {cpus} loader "
               "workers instead", file=sys.stderr)
    return cpus


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


# ============ a long run: resumed, saved, stopped ============
class UserError(Exception):
    """A mistake in the command or the files, or a file the run cannot write: one line, exit code 2 (train.py)."""


# changing these on resume would silently change the schedules or the model
SCHEDULE_KEYS = ["arch", "patch_size", "depth", "out_dim", "use_bn_in_head", "epochs", "batch_size", "world_size",
                 "lr", "min_lr", "warmup_epochs", "weight_decay", "weight_decay_end", "momentum_teacher", "centering",
                 "koleo_weight", "center_momentum", "warmup_teacher_temp", "teacher_temp", "warmup_teacher_temp_epochs",
                 "freeze_last_layer", "local_crops_number", "color_jitter", "data", "global_size", "local_size", "seed",
                 "no_centering", "no_sharpening", "optimizer", "curriculum_epochs", "curriculum_sizes", "patch_drop",
                 "teacher"]


def training_state(parts, it, niter_per_ep, args, history, epoch_sums):
    """What checkpoint.pth holds: every state dict, where the run is, its args, RNG states, log so far (and, stopped
    mid-epoch, the running sums of the epoch's log line)."""
    # drop-path draws from the generator of the device the student is on: the CPU's, or the GPU's on CUDA
    mine = (torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None)
    rng = [mine]
    if dist.is_initialized():  # each rank has its own generators; a collective: every rank calls this
        rng = [None] * dist.get_world_size()
        dist.all_gather_object(rng, mine)
    return {**{name: part.state_dict() for name, part in parts.items()}, "epoch": it // niter_per_ep,
            "iteration": it, "args": vars(args), "rng": [cpu for cpu, _ in rng], "cuda_rng": [gpu for _, gpu in rng],
            "history": history, "epoch_sums": epoch_sums}


def resume(output_dir, parts, args, niter_per_ep, rank):
    """Load OUT/checkpoint.pth into `parts` if there is one, and make log.txt its history (a run killed between the
    two saves left it one line short). Returns (iteration, history, running sums of a stopped epoch)."""
    path = os.path.join(output_dir, "checkpoint.pth")
    if not os.path.isfile(path):
        write_log(output_dir, [], rank)  # also finds an output folder that cannot be written before training
        return 0, [], None
    ckpt = checkpoint.load(path)
    same = lambda a, b: tuple(a) == tuple(b) if isinstance(a, (list, tuple)) else a == b
    changed = [f"--{k} was {ckpt['args'][k]}, now {vars(args)[k]}" for k in SCHEDULE_KEYS if k in ckpt["args"]
               and not same(ckpt["args"][k], vars(args)[k])]
    if changed:
        raise UserError(f"cannot resume {path}: {'; '.join(changed)} (this would break the schedules); "
                        f"use another --output_dir or the same flags")
    for name, part in parts.items():
        part.load_state_dict(ckpt[name])
    torch.set_rng_state(ckpt["rng"][rank % len(ckpt["rng"])])
    cuda_rng = ckpt.get("cuda_rng") or [None]  # absent from CPU runs' checkpoints (and from older ones)
    if cuda_rng[rank % len(cuda_rng)] is not None and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(cuda_rng[rank % len(cuda_rng)])
    write_log(output_dir, ckpt["history"], rank)
    print_once(rank, f"resumed from {path} at epoch {ckpt['iteration'] // niter_per_ep}, iteration {ckpt['iteration']}")
    return ckpt["iteration"], ckpt["history"], ckpt["epoch_sums"]


def save_run(state, output_dir, rank, keep_every=0):
    """checkpoint.pth; at an epoch's end (a state without running sums) also log.txt, from the history it holds, and
    every `keep_every` epochs a copy, checkpointNNNN.pth. log.txt is only ever the checkpoint's history: a crash
    between the two leaves it one line short and `resume` re-writes it, so no epoch is missing or doubled."""
    if rank != 0:
        return
    with stopping_on_write_errors(output_dir):
        checkpoint.save(state, os.path.join(output_dir, "checkpoint.pth"))
        if state["epoch_sums"] is None:
            write_log(output_dir, state["history"], rank)
            if keep_every and state["epoch"] % keep_every == 0:
                checkpoint.save(state, os.path.join(output_dir, f"checkpoint{state['epoch'] - 1:04}.pth"))


def write_log(output_dir, history, rank):
    """OUT/log.txt: one JSON line per finished epoch, the whole file re-written at once (atomic)."""
    if rank == 0:
        with stopping_on_write_errors(output_dir):
            text = "".join(json.dumps(h) + "\n" for h in history)
            checkpoint.write_text(os.path.join(output_dir, "log.txt"), text)


@contextlib.contextmanager
def stopping_on_write_errors(output_dir):
    """A file of the run that cannot be written ends the run: one line naming the file, the cause and the checkpoint
    kept (checkpoint.WriteError -> UserError, exit code 2). Training on without a way to save would lose the work."""
    try:
        yield
    except checkpoint.WriteError as e:
        writable = f"make {output_dir} writable"
        advice = {errno.ENOSPC: "free space", errno.EDQUOT: "free space", errno.EACCES: writable,
                  errno.EPERM: writable, errno.EROFS: writable}.get(e.errno, "fix that")
        ckpt_path = os.path.join(output_dir, "checkpoint.pth")
        again = "resume" if os.path.isfile(ckpt_path) else "start"
        raise UserError(f"{e}; {checkpoint.kept(ckpt_path)}; {advice} and re-run to {again}") from None


class EpochMeter:
    """Running sums of the loss, the teacher entropy h(P_t) and KL(P_t ‖ P_s) (Fig. 7) over an epoch, kept on the
    device: nothing in the step waits for the host. The first non-finite loss is remembered, checked at intervals."""

    def __init__(self, device, sums=None):
        self.sums = torch.zeros(4, device=device) if sums is None else sums.to(device)  # loss, h, KL, steps
        self.first_bad = torch.full((), -1, device=device)  # iteration of the first non-finite loss, or -1
        self.t0, self.seen = time.time(), 0

    def add(self, loss, stats, it, n_images):
        one = torch.ones((), device=loss.device)
        self.sums += torch.stack([loss.float(), stats["teacher_entropy"], stats["kl"], one])
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss), it, self.first_bad)
        self.seen += n_images

    def check_finite(self, niter_per_ep, output_dir):
        bad = int(self.first_bad)
        if bad >= 0:
            ckpt_path = os.path.join(output_dir, "checkpoint.pth")
            kept = f"the last good checkpoint is {ckpt_path}" if os.path.isfile(ckpt_path) else \
                "no checkpoint was written"
            raise UserError(f"loss is not finite at epoch {bad // niter_per_ep}, iteration {bad}; stopped ({kept}). "
                            "Try a lower --lr, --clip_grad 3, a lower --teacher_temp or --precision fp32")

    def img_per_s(self):
        return self.seen / (time.time() - self.t0)

    def means(self):
        loss, entropy, kl, n = self.sums.tolist()
        return {"loss": loss / n, "teacher_entropy": entropy / n, "kl": kl / n}

    def postfix(self, loss, stats):
        return dict(loss=f"{loss.item():.3f}", h_t=f"{stats['teacher_entropy'].item():.2f}",
                    img_s=f"{self.img_per_s():.1f}")


def catch_stop_signals():
    """SIGINT/SIGTERM only raise a flag: the step in progress ends, then the loop saves a checkpoint and exits."""
    stop = {"signal": None}
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda signum, frame: stop.update(signal=signum))
    return stop


def stop_requested(stop, it, every, device):
    """Did SIGINT/SIGTERM arrive? When distributed, all ranks agree every `every` steps (one tiny all-reduce)."""
    if not dist.is_initialized():
        return stop["signal"] is not None
    if it % every:
        return False
    flag = torch.tensor(stop["signal"] or 0, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    stop["signal"] = int(flag) or None
    return stop["signal"] is not None


def save_and_exit(state, output_dir, epoch, stop, rank):
    """Save where the run is, mid-epoch included (state None: at an epoch's end, saved already), and exit 128 + the
    signal number (as a killed process would)."""
    if state is not None:
        save_run(state, output_dir, rank)
    where = f"epoch {epoch}, iteration {state['iteration']}" if state else f"the end of epoch {epoch}"
    print_once(rank, f"interrupted: checkpoint saved at {where}; re-run the same command to resume", file=sys.stderr)
    sys.exit(128 + (stop["signal"] or 15))
