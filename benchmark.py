"""Throughput, FLOPs and MFU of one DINO training step, and the cost of the multi-crop augmentation (Table 8 style).

    python benchmark.py      # ViT-S/16, 8 images (64 on CUDA) x (2x224 + 6x96 crops), K 65536: ours vs official
    python benchmark.py --compile            # our step with torch.compile'd backbones
    python benchmark.py --arch vit_tiny --depth 2 --out_dim 4096 --no_baseline --no_aug --no_cpu_preset  # quick
    python benchmark.py --profile 2          # where the time of our step goes (torch.profiler, top ops)

Sections, measured in one run on one machine: (1) our step: train.train_one_step itself, the function train.py's
loop runs (schedules held at their base values, past the frozen-last-layer epochs); median of --steps after
--warmup; FLOPs counted once with FlopCounterMode (teacher forward, student forward+backward, loss; attention as its
matmuls whatever kernel runs it); MFU = achieved FLOP/s over the best FLOP/s of a square matmul in the precision
used, measured here; then every matmul of one step re-run alone (same shapes), summed: the step's time if all
else were free. Then the same for the step of train.py's cpu preset (vit_tiny/8, 64 images, 2x64 + 4x32,
K 256, KoLeo: what `python train.py` runs; --no_cpu_preset skips it). (2) The official step as shipped
(main_dino.py, re-written here), at both configurations: fp32 on CPU (its autocast is CUDA's), fp16 autocast with
GradScaler on CUDA (as it runs on GPUs, against the fp16 matmul peak), attention matrix materialised, the loss as a
double loop over crop pairs, two host syncs per parameter in clipping, the default AdamW (a for-loop on CPU), EMA as
a loop, loss.item().
(3) The multi-crop augmentation per image per loader worker (2x224 + 8x96 of a 500x375 image, 1 process, 1 thread):
augment.MultiCropAugmentation, a batch of --aug_images images at once as train.py's collate makes them, against the
official torchvision/PIL pipeline ending in ToTensor + Normalize, image by image; then the same at the cpu preset's
sizes (2x64 + 4x32 of a 64 px image of the embedded data).
On CUDA the device is synchronised around every timed call, both steps' crops are pinned (as both loaders pin
them), and memory is the peak that torch.cuda.max_memory_allocated reports while the step runs.
The last line is one JSON object. Timings on a busy machine are not final: the load average is printed.
"""
import argparse
import json
import math
import os
import random
import resource
import statistics
import sys
import time
import types

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image, ImageFilter, ImageOps
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import augment
import checkpoint
import data
import distributed
import train
import vit
from loss import DINOLoss

aten = torch.ops.aten


# ============ the official step's pieces (main_dino.py, utils.py, vision_transformer.py: same maths) ============
def explicit_attention(self, x):
    """Official Attention.forward: the (B, heads, N, N) attention matrix is materialised, then multiplied by v."""
    B, N, C = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # each (B, heads, N, C/heads)
    attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # (B, heads, N, N)
    return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))  # (B, N, C)


class OfficialDINOLoss(DINOLoss):
    """Official DINOLoss.forward: one cross-entropy per (teacher view, student view) pair, in a Python double loop."""

    def forward(self, student_output, teacher_output, epoch):
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        temp = self.teacher_temps[epoch]
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)
        total_loss, n_loss_terms = 0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue  # a view is never its own target
                total_loss += torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        self.update_center(teacher_output)
        return total_loss


def official_clip_gradients(model, clip):
    """Official utils.clip_gradients: a norm, an .item() and an `if` on a tensor (two host syncs) per parameter."""
    norms = []
    for _, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms


def official_augmentation(global_size=224, local_size=96, local_crops_number=8, global_crops_scale=(0.4, 1.0),
                          local_crops_scale=(0.05, 0.4), blur_radius=(0.1, 2.0)):
    """Official DataAugmentationDINO: torchvision transforms on PIL images, normalised float tensors out (the
    defaults are the official code's; the others give the same pipeline at the cpu preset's sizes)."""
    def blur(p):  # utils.GaussianBlur: PIL's, radius U(0.1, 2), applied with probability p
        return T.Lambda(lambda im: im.filter(ImageFilter.GaussianBlur(radius=random.uniform(*blur_radius)))
                        if random.random() <= p else im)
    solarize = T.Lambda(lambda im: ImageOps.solarize(im) if random.random() < 0.2 else im)  # utils.Solarization
    flip_and_color_jitter = T.Compose([
        T.RandomHorizontalFlip(p=0.5),
        T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        T.RandomGrayscale(p=0.2)])
    normalize = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    crop = lambda size, scale: T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC)
    global1 = T.Compose([crop(global_size, global_crops_scale), flip_and_color_jitter, blur(1.0), normalize])
    global2 = T.Compose([crop(global_size, global_crops_scale), flip_and_color_jitter, blur(0.1), solarize, normalize])
    local = T.Compose([crop(local_size, local_crops_scale), flip_and_color_jitter, blur(0.5), normalize])
    return lambda img: [global1(img), global2(img)] + [local(img) for _ in range(local_crops_number)]


# ============ measuring ============
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device, n, warmup):
    """Wall seconds of n calls of fn after `warmup` untimed ones, the device synchronised around each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def matmul_peak_gflops(dtype, device, n, reps=20):
    """Best FLOP/s of an n x n @ n x n matmul in `dtype`: what a step in this precision can at most approach."""
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    return 2 * n ** 3 / min(time_calls(lambda: a @ b, device, reps, warmup=2)) / 1e9


def with_peak_memory(fn, device):
    """(fn(), peak memory in MB while it ran): CUDA's allocated bytes; on CPU the growth of the resident set (what
    glibc kept from earlier frees, distributed.keep_freed_memory, is handed back first, or it would hide the growth)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return fn(), torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:  # Linux: reset the resident high-water mark (VmHWM) to the current size, read both from /proc
        distributed.release_freed_memory()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        status = lambda key: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) / 1024
        before = status("VmRSS:")
        return fn(), status("VmHWM:") - before
    except OSError:  # elsewhere: growth of the lifetime maximum (kB on Linux)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return fn(), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


# model FLOPs of attention: 2 matmuls forward, 4 backward, whatever kernel runs it (recomputation not counted)
_fwd = lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v)
_bwd = lambda grad, q, k, v, *args, out_shape=None, **kw: 2 * sdpa_flop_count(q, k, v)
SDPA_FLOPS = {aten._scaled_dot_product_flash_attention_for_cpu: _fwd,
              **{op: _bwd for op in (aten._scaled_dot_product_flash_attention_for_cpu_backward,
                                     aten._scaled_dot_product_flash_attention_backward,
                                     aten._scaled_dot_product_efficient_attention_backward,
                                     aten._scaled_dot_product_cudnn_attention_backward)}}


# ============ the step's matmuls alone: where the rest of the time goes ============
MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.convolution.default,
           aten.convolution_backward.default,
           *(getattr(aten, f"_scaled_dot_product_{kernel}_attention{part}").default  # CUDA's attention kernels
             for kernel in ("flash", "efficient", "cudnn") for part in ("", "_backward")),
           aten._scaled_dot_product_flash_attention_for_cpu.default,
           aten._scaled_dot_product_flash_attention_for_cpu_backward.default}


class RecordMatmuls(TorchDispatchMode):
    """Every matmul-like call below autograd and autocast (forward and backward), with its inputs' shapes,
    strides and dtypes: what the step asks of the matmul kernels, whatever else runs around them."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            spec = lambda a: (("T", tuple(a.shape), a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor)
                              else tuple(a) if isinstance(a, list) else a)  # lists (conv strides...) as tuples
            self.calls.append((func, tuple(spec(a) for a in args), tuple(sorted((kwargs or {}).items()))))
        return func(*args, **(kwargs or {}))


def matmul_only_seconds(run, device, reps=5):
    """Seconds that the matmuls of one call of `run` take when each runs alone here (same shapes, strides and
    dtypes, random inputs; the best of `reps` per distinct call, times how often the step makes it), summed: the
    step's time if everything but its matmuls were free. A call that cannot be re-run alone (a kernel's private
    inputs, e.g. an attention backward's random-number state) is left out, and said so."""
    with RecordMatmuls() as rec:
        run()
    counts = {}
    for call in rec.calls:
        counts[call] = counts.get(call, 0) + 1
    def tensor(shape, stride, dtype, on):
        size = 1 + sum((d - 1) * st for d, st in zip(shape, stride))  # the storage the strides reach
        values = torch.randn(size, device=on) if dtype.is_floating_point else torch.zeros(size, device=on)
        return values.to(dtype).as_strided(shape, stride)
    total, left_out = 0.0, []
    for (func, spec, kw), n in counts.items():
        try:
            args = [tensor(*a[1:]) if isinstance(a, tuple) and a and a[0] == "T" else a for a in spec]
            total += n * min(time_calls(lambda: func(*args, **dict(kw)), device, reps, warmup=1))
        except (RuntimeError, TypeError, ValueError) as e:
            left_out.append(f"{func} ({str(e).splitlines()[0][:80]})")
    if left_out:
        print(f"matmuls alone: {len(left_out)} kind(s) of call left out: {'; '.join(left_out)}")
    return total


# ============ the two steps ============
def make_step(targs, device, precision, official=False, epoch=None):
    """Student, teacher, loss, optimizer and one training step on fixed random crops of targs' shapes, as in `epoch`
    (default: the first past the frozen last layer; it sets the curriculum's crop sizes and the patch-drop ratio).
    Returns (step, count_flops, compile_backbones); step.student and step.teacher are the models."""
    torch.manual_seed(0)
    student = train.build_model(targs, targs.drop_path_rate).to(device)
    teacher = train.build_model(targs, 0.0).to(device)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    B = targs.batch_size
    epoch = targs.freeze_last_layer if epoch is None else epoch  # past the frozen epochs: every parameter is updated
    dino_loss = (OfficialDINOLoss if official else DINOLoss)(
        targs.out_dim, 2 + targs.local_crops_number, targs.warmup_teacher_temp, targs.teacher_temp,
        targs.warmup_teacher_temp_epochs, targs.epochs).to(device)
    if official:
        for module in [*student.modules(), *teacher.modules()]:
            if isinstance(module, vit.Attention):
                module.forward = types.MethodType(explicit_attention, module)
        optimizer = torch.optim.AdamW(train.param_groups(student))  # the default implementation, as shipped
    else:
        optimizer = torch.optim.AdamW(train.param_groups(student), lr=0.0, fused=device.type in ("cuda", "cpu"))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast = torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16,
                              enabled=precision in ("bf16", "fp16"))
    global_size, local_size = train.crop_sizes(targs, epoch)
    sizes = [global_size] * 2 + [local_size] * targs.local_crops_number
    crops_u8 = [torch.randint(0, 256, (B, 3, s, s), dtype=torch.uint8) for s in sizes]  # what our loader yields
    crops_f32 = [augment.normalize(c) for c in crops_u8]  # what the official loader yields (normalised in workers)
    if device.type == "cuda":  # both loaders pin their batches on CUDA (pin_memory=True)
        crops_u8, crops_f32 = [c.pin_memory() for c in crops_u8], [c.pin_memory() for c in crops_f32]
    lr, wd, m = targs.lr * B / 256, targs.weight_decay, targs.momentum_teacher

    def step():  # train.py's step itself: what its loop runs, whatever changes in it later
        return train.train_one_step(student, teacher, dino_loss, optimizer, scaler, autocast, crops_u8, epoch,
                                    lr, wd, m, targs)

    def official_step():  # main_dino.py train_one_epoch
        for i, pg in enumerate(optimizer.param_groups):
            pg["lr"] = lr
            if i == 0:  # only the weight matrices are decayed
                pg["weight_decay"] = wd
        images = [im.to(device, non_blocking=True) for im in crops_f32]
        with autocast:
            teacher_output = teacher(images[:2])
            student_output = student(images)
            loss = dino_loss(student_output, teacher_output, epoch)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"loss is {loss.item()}")
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        if targs.clip_grad:
            scaler.unscale_(optimizer)
            official_clip_gradients(student, targs.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():
            for param_q, param_k in zip(student.parameters(), teacher.parameters()):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        sync(device)
        return loss.item()

    run = official_step if official else step
    run.student, run.teacher = student, teacher

    def count_flops():
        with FlopCounterMode(display=False, custom_mapping=SDPA_FLOPS) as counter:
            run()
        return counter.get_total_flops()

    def compile_backbones():
        for model in (student, teacher):
            model.backbone.compile(dynamic=False)  # one static graph per crop resolution; state_dict keys unchanged
    return run, count_flops, compile_backbones


# ============ augmentation ============
def sample_image(w=500, h=375):
    """A fixed photo-sized RGB image: smooth colour gradients and texture."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, 128 + 100 * np.sin(xx / 23.0) * np.cos(yy / 17.0)], -1)
    noise = np.random.default_rng(0).normal(0, 25, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def attention_kernels(device, precision, reps=20):
    """Attention alone, written out (softmax(q k^T / sqrt(d)) v) vs the fused SDPA kernel, forward + backward (the
    student) and forward only (the teacher), at the sequence lengths of both configurations, q, k and v cut from
    one qkv projection as vit.Attention does: the measurement behind vit.Attention's choice on CPU."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    print(f"\nattention alone, {precision}: median ms of {reps}; SDPA / explicit below 1 means SDPA is faster")
    print(f"{'':44}{'forward + backward':>30}{'forward only':>30}")
    print(f"{'':44}{'explicit     SDPA  SDPA/expl.':>30}{'explicit     SDPA  SDPA/expl.':>30}")
    for name, B, N, heads in [("cpu preset, 64 px", 128, 65, 3), ("cpu preset, 32 px", 256, 17, 3),
                              ("ViT-S/16, 224 px", 16, 197, 6), ("ViT-S/16, 96 px", 48, 37, 6)]:
        qkv = torch.randn(B, N, 3, heads, 64, device=device).to(dtype or torch.float32).requires_grad_()  # as qkv(x)
        times = {}
        for kernel in ("explicit", "sdpa"):
            for backward in (True, False):
                def call():
                    with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None), \
                            torch.set_grad_enabled(backward):
                        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, 64), as vit.Attention
                        if kernel == "sdpa":
                            x = F.scaled_dot_product_attention(q, k, v)
                        else:
                            x = ((q * 64 ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
                    if backward:
                        x.float().sum().backward()
                times[kernel, backward] = 1e3 * statistics.median(time_calls(call, device, reps, 3))
        cols = "".join(f"{times['explicit', bw]:9.2f}{times['sdpa', bw]:9.2f}"
                       f"{times['sdpa', bw] / times['explicit', bw]:12.2f}" for bw in (True, False))
        print(f"{name:18} {B:4} x {heads} heads x {N:3} tokens{cols}")


def ms_per_image(fn, n, repeats=3):
    """Milliseconds per image on one thread (a loader worker's view), best of `repeats` calls of fn(), which
    augments n images."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return 1e3 * min(time_calls(fn, torch.device("cpu"), repeats, 1)) / n
    finally:
        torch.set_num_threads(threads)


def augmentation(img, kw, n, title):
    """Ours (n copies of img as one batch, as train.py's collate makes them) against the official pipeline (image
    by image, as its Dataset does) with the same crop sizes, scales and blur radii; prints a table."""
    ours = augment.MultiCropAugmentation(**kw)
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    random.seed(0), torch.manual_seed(0)
    official = official_augmentation(**kw)
    res = {"aug_ms_per_img": ms_per_image(lambda: ours.batch([img] * n, gens), n),
           "aug_official_ms_per_img": ms_per_image(lambda: [official(img) for _ in range(n)], n)}
    res["aug_speedup"] = res["aug_official_ms_per_img"] / res["aug_ms_per_img"]
    print(f"\naugmentation: {title.format(**kw)}, 1 process, 1 thread, {n} images\n{'':14}{'ms/img':>8}{'img/s':>7}")
    for name, ms in (("ours", res["aug_ms_per_img"]), ("official", res["aug_official_ms_per_img"])):
        print(f"{name:14}{ms:>8.2f}{1e3 / ms:>7.1f}")
    print(f"our augmentation is {res['aug_speedup']:.2f}x faster than the official one")
    return res


# ============ main ============
def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vit_small", help=f"one of {', '.join(vit.ARCHS)} (checked by train.py)")
    p.add_argument("--patch", "--patch_size", dest="patch_size", default=16, type=int)
    p.add_argument("--depth", default=12, type=int, help="Transformer blocks (fewer for a quick look).")
    p.add_argument("--batch_size", default=None, type=int, help="Images per step (each gives all its crops); "
                   "default: 8 on CPU, 64 on CUDA (the paper's per GPU).")
    p.add_argument("--global_size", default=224, type=int)
    p.add_argument("--local_size", default=96, type=int)
    p.add_argument("--local_crops_number", default=6, type=int)
    p.add_argument("--out_dim", default=65536, type=int, help="K, the DINO head's output dimension.")
    p.add_argument("--steps", default=None, type=int, help="Timed steps of ours (the median is reported); "
                   "default: 5 on CPU, 20 on CUDA.")
    p.add_argument("--warmup", default=None, type=int, help="Untimed steps first (allocator, kernels, compilation); "
                   "default: 2 on CPU, 5 on CUDA.")
    p.add_argument("--baseline_steps", default=None, type=int, help="Timed steps of the official one; default: 3 "
                   "on CPU, 10 on CUDA.")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="Of our step; auto: bf16 where supported, as train.py.")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbones in our step.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--matmul_size", default=None, type=int, help="Side of the peak matmul (2048 CPU, 8192 CUDA).")
    p.add_argument("--no_baseline", action="store_true", help="Skip the official step.")
    p.add_argument("--no_aug", action="store_true", help="Skip the augmentation section.")
    p.add_argument("--no_cpu_preset", action="store_true", help="Skip the second configuration: the step of "
                   "train.py's cpu preset (what `python train.py` runs).")
    p.add_argument("--aug_images", default=64, type=int,
                   help="Images per augmentation timing (ours as one batch, as train.py's collate: a batch of 64).")
    p.add_argument("--profile", default=0, type=int, help="Profile N steps of ours and print the top ops.")
    p.add_argument("--attention", action="store_true", help="Also time attention alone, written out vs SDPA, at "
                   "the sequence lengths of both configurations (what vit.Attention chooses between).")
    a = p.parse_args(argv)
    cuda = a.device.startswith("cuda")
    for k, on_cpu, on_cuda in (("batch_size", 8, 64), ("steps", 5, 20), ("warmup", 2, 5), ("baseline_steps", 3, 10)):
        if getattr(a, k) is None:
            setattr(a, k, on_cuda if cuda else on_cpu)
    return a


def time_steps(targs, a, device, precision, peaks, peak, profile=True, epoch=None, baseline=True):
    """Our step (and the official one unless --no_baseline) at targs' shapes: (results, table rows, GFLOP/step)."""
    step, count_flops, compile_backbones = make_step(targs, device, precision, epoch=epoch)
    gflop = count_flops() / 1e9  # eager, before any compilation
    matmul_s = matmul_only_seconds(step, device)
    if a.compile:
        compile_backbones()
        t0 = time.perf_counter()
        step(), step()  # tracing and code generation: one graph per resolution, teacher and student
        print(f"compiled in {time.perf_counter() - t0:.0f} s (first two steps)")
    times, mem = with_peak_memory(lambda: time_calls(step, device, a.steps, a.warmup), device)
    peaks[precision] = max(peaks[precision], peak(precision))  # measured again: a busy machine lowers it
    s = statistics.median(times)
    res = dict(step_s=s, img_per_s=targs.batch_size / s, gflop_per_step=gflop, achieved_gflops=gflop / s,
               matmul_peak_gflops=peaks[precision], mfu=gflop / s / peaks[precision], peak_mem_mb=mem,
               step_times=[round(t, 3) for t in times], matmul_only_s=matmul_s,
               matmul_only_mfu=gflop / matmul_s / peaks[precision])
    rows = [("ours" + (" compiled" if a.compile else ""), precision, s, mem)]
    if a.profile and profile:
        with torch.profiler.profile() as prof:
            time_calls(step, device, a.profile, 0)
        print(prof.key_averages().table(sort_by=f"self_{'device' if device.type == 'cuda' else 'cpu'}_time_total",
                                        row_limit=25))
    del step, count_flops, compile_backbones  # ours is freed before the official step's memory is measured
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if baseline and not a.no_baseline:
        bprec = "fp16" if device.type == "cuda" else "fp32"  # main_dino.py: torch.cuda.amp.autocast(use_fp16)
        official = make_step(targs, device, bprec, official=True)[0]
        btimes, bmem = with_peak_memory(lambda: time_calls(official, device, a.baseline_steps, 1), device)
        del official
        peaks[bprec] = max(peaks.get(bprec, 0), peak(bprec))
        b = statistics.median(btimes)
        res.update(baseline_step_s=b, baseline_img_per_s=targs.batch_size / b, speedup=b / s,
                   baseline_mfu=gflop / b / peaks[bprec], baseline_peak_mem_mb=bmem, baseline_precision=bprec)
        rows.append(("official", bprec, b, bmem))
    return res, rows, gflop


def print_rows(rows, gflop, batch_size, peaks):
    print(f"\n{'step':14}{'precision':>10}{'step s':>8}{'img/s':>7}{'GFLOP':>7}{'GFLOP/s':>9}{'peak':>7}"
          f"{'MFU':>6}{'mem MB':>8}")
    for name, prec, t, mem in rows:
        print(f"{name:14}{prec:>10}{t:>8.3f}{batch_size / t:>7.2f}{gflop:>7.0f}{gflop / t:>9.1f}{peaks[prec]:>7.0f}"
              f"{gflop / t / peaks[prec]:>6.2f}{mem:>8.0f}")
    print("peak: best GFLOP/s of a square matmul in that precision here; MFU = GFLOP/s / peak")


def print_matmul_only(res):
    s, mm = res["step_s"], res["matmul_only_s"]
    print(f"ours: its matmuls alone (each re-run on its own, same shapes) take {mm:.3f} s of the {s:.3f} s step "
          f"({mm / s:.0%}); with nothing else to do the step would reach MFU {res['matmul_only_mfu']:.2f}")


QUICK = ["--epochs", "6", "--curriculum_epochs", "3", "--patch_drop", "0.5", "0.5"]  # docs/cpu_recipe.md


def cpu_preset_steps(a, device, precision, peaks, peak):
    """The cpu preset's step (what `python train.py` runs), then, epoch by epoch, the same with the speed levers of
    docs/cpu_recipe.md (QUICK: 6 epochs, the first 3 at 48/24 px, the student dropping half its global patches)."""
    cpu = train.get_args(["--preset", "cpu"])
    print(f"\nthe cpu preset's step: {cpu.arch}/{cpu.patch_size} depth {cpu.depth}, {cpu.batch_size} images x "
          f"(2x{cpu.global_size} + {cpu.local_crops_number}x{cpu.local_size}), K {cpu.out_dim}, KoLeo "
          f"{cpu.koleo_weight}")
    cres, crows, cgflop = time_steps(cpu, a, device, precision, peaks, peak, profile=False)
    print_rows(crows, cgflop, cpu.batch_size, peaks)
    print_matmul_only(cres)
    if "speedup" in cres:
        print(f"our step is {cres['speedup']:.2f}x faster than the official one")
    quick = train.get_args(["--preset", "cpu", *QUICK])
    print(f"\nwith the speed levers ({' '.join(QUICK)}), epoch by epoch:\n{'epoch':>5}{'crops':>12}{'drop':>6}"
          f"{'step s':>8}{'img/s':>7}{'GFLOP/img':>10}{'MFU':>6}")
    epochs = []
    for e in range(quick.epochs):
        r = time_steps(quick, a, device, precision, peaks, peak, profile=False, epoch=e, baseline=False)[0]
        g, loc = train.crop_sizes(quick, e)
        print(f"{e:>5}{f'{g}/{loc} px':>12}{train.patch_drop_ratio(quick, e):>6.2f}{r['step_s']:>8.3f}"
              f"{r['img_per_s']:>7.1f}{r['gflop_per_step'] / quick.batch_size:>10.2f}{r['mfu']:>6.2f}")
        epochs.append(r)
    step_s = statistics.mean(r["step_s"] for r in epochs)  # every epoch has the same number of steps
    gflop = statistics.mean(r["gflop_per_step"] for r in epochs)
    run = quick.epochs * step_s / (cpu.epochs * cres["step_s"])
    print(f"mean: {step_s:.3f} s a step, {quick.batch_size / step_s:.1f} img/s, {gflop / quick.batch_size:.2f} GFLOP "
          f"an image, MFU {gflop / step_s / peaks[precision]:.2f} (the preset: {cres['step_s']:.3f} s, "
          f"{cgflop / cpu.batch_size:.2f} GFLOP an image); the run's steps take {run:.2f}x the preset's")
    res = {f"cpu_preset_{k}": v for k, v in cres.items()}
    res.update(cpu_preset_gflop_per_image=cgflop / cpu.batch_size, cpu_levers_step_s=step_s,
               cpu_levers_img_per_s=quick.batch_size / step_s, cpu_levers_gflop_per_image=gflop / quick.batch_size,
               cpu_levers_mfu=gflop / step_s / peaks[precision], cpu_levers_run_steps_ratio=run,
               cpu_levers_epoch_step_s=[round(r["step_s"], 4) for r in epochs])
    return res


def main(a):
    distributed.keep_freed_memory()  # as train.py (distributed.init): freed tensors are reused, not page-faulted in
    device = torch.device(a.device)
    precision = train.resolve_precision(a.precision, device)
    flags = dict(arch=a.arch, patch=a.patch_size, depth=a.depth, batch_size=a.batch_size, global_size=a.global_size,
                 local_size=a.local_size, local_crops_number=a.local_crops_number, out_dim=a.out_dim)
    targs = train.get_args(["--preset", "paper"] + [w for k, v in flags.items() for w in (f"--{k}", str(v))])
    n = a.matmul_size or (8192 if device.type == "cuda" else 2048)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    peak = lambda prec: matmul_peak_gflops(dtypes[prec], device, n)
    load = lambda: " ".join(f"{x:.2f}" for x in os.getloadavg())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{a.arch}/{a.patch_size} depth {a.depth}, {a.batch_size} images x (2x{a.global_size} + "
          f"{a.local_crops_number}x{a.local_size}), K {a.out_dim}, {device} ({name}), {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}, load average {load()}")
    peaks = {precision: peak(precision)}

    res, rows, gflop = time_steps(targs, a, device, precision, peaks, peak)
    print_rows(rows, gflop, a.batch_size, peaks)
    print_matmul_only(res)
    if "speedup" in res:
        print(f"our step is {res['speedup']:.2f}x faster than the official one")
    if not a.no_cpu_preset:  # the second configuration: the step `python train.py` runs, what students time
        res.update(cpu_preset_steps(a, device, precision, peaks, peak))
    if a.attention:
        attention_kernels(device, precision)
    if not a.no_aug:
        paper = dict(local_crops_number=8, global_size=a.global_size, local_size=a.local_size)  # official default
        res.update(augmentation(sample_image(), paper, a.aug_images, "2x{global_size} + {local_crops_number}x"
                                "{local_size} of a 500x375 image"))
        if not a.no_cpu_preset:  # the views `python train.py` makes, of a 64 px image of the embedded data
            cpu = train.get_args(["--preset", "cpu"])
            keys = ("global_crops_scale", "local_crops_scale", "local_crops_number", "global_size", "local_size",
                    "blur_radius")  # its --color_jitter is 1, the official strength
            image = Image.fromarray(data.generate(1)[0][0])
            res.update({f"cpu_preset_{k}": v for k, v in augmentation(image, {k: getattr(cpu, k) for k in keys},
                        a.aug_images, "the cpu preset's 2x{global_size} + {local_crops_number}x{local_size} of a "
                        "64 px image").items()})

    print(f"load average at the end: {load()}")
    res.update(flags, ncrops=2 + a.local_crops_number, precision=precision, compile=a.compile, device=str(device),
               device_name=name,
               threads=torch.get_num_threads(), loadavg=round(os.getloadavg()[0], 2))
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}))
    return res


if __name__ == "__main__":
    try:
        main(get_args())
    except (train.UserError, checkpoint.CheckpointError) as e:  # bad flags: one line, exit code 2, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
