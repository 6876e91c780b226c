"""DINO training: a student learns to match a momentum teacher across multi-crop views (paper Alg. 1, Sec. 3).

    python train.py                                   # CPU recipe on the embedded data: 5-12 min on 2 cores (bf16)
    python train.py --data /path/to/images            # the paper recipe on an image folder (one GPU)
    torchrun --nproc_per_node=8 train.py --arch vit_small --patch 16 --data /path/imagenet/train

Read `train_one_step` first: the DINO step of Alg. 1 and nothing else (train.py's loop, benchmark.py and the tests
all run this one function). `main` is Alg. 1 around it: data, networks, loss, optimizer and schedules, then the loop
with a log line (OUT/log.txt) and a checkpoint (OUT/checkpoint.pth) per epoch. Re-running the same command resumes;
the bookkeeping of a long run (resume, signals, files that cannot be written) is distributed.py's.
"""
import argparse
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

import augment
import checkpoint
import data
import distributed
import eval_knn
import exercises
import vit
from distributed import (EpochMeter, UserError, catch_stop_signals, loader_workers, print_once, resume, save_and_exit,
                         save_run, stop_requested, training_state)
from head import DINOHead
from loss import DINOLoss, koleo_loss, stop_if_collapsed

# Recipes: the paper's (Sec. 3.2) and a small one that learns on 2 CPU cores in minutes; each value has its flag.
PRESETS = {
    "paper": dict(arch="vit_small", patch_size=16, out_dim=65536, norm_last_layer=True, use_bn_in_head=False,
                  momentum_teacher=0.996, centering="ema", koleo_weight=0.0, center_momentum=0.9,
                  warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30,
                  weight_decay=0.04, weight_decay_end=0.4, clip_grad=3.0, batch_size=64, epochs=100,
                  freeze_last_layer=1, lr=0.0005, warmup_epochs=10, min_lr=1e-6, drop_path_rate=0.1,
                  global_crops_scale=(0.4, 1.0), local_crops_number=10, local_crops_scale=(0.05, 0.4),
                  global_size=224, local_size=96, blur_radius=(0.1, 2.0), color_jitter=1.0, depth=12, knn_every=0,
                  num_workers=10, stop_on_collapse=False, curriculum_epochs=0, curriculum_sizes=(224, 96),
                  patch_drop=(0.0, 0.0), optimizer="adamw", teacher="momentum"),
    "cpu": dict(arch="vit_tiny", patch_size=8, out_dim=256, norm_last_layer=True, use_bn_in_head=False,
                momentum_teacher=0.95, centering="ema", koleo_weight=0.1, center_momentum=0.0,
                warmup_teacher_temp=0.02, teacher_temp=0.02, warmup_teacher_temp_epochs=0,
                weight_decay=0.04, weight_decay_end=0.1, clip_grad=3.0, batch_size=64, epochs=8,
                freeze_last_layer=0, lr=0.002, warmup_epochs=1, min_lr=1e-5, drop_path_rate=0.0,
                global_crops_scale=(0.4, 1.0), local_crops_number=4, local_crops_scale=(0.05, 0.4),
                global_size=64, local_size=32, blur_radius=(0.1, 0.45), color_jitter=1.0, depth=4, knn_every=2,
                num_workers=0, stop_on_collapse=True, curriculum_epochs=0, curriculum_sizes=(48, 24),
                patch_drop=(0.0, 0.0), optimizer="adamw", teacher="momentum"),
}
# --preset paper with a ResNet (--arch resnet50): the official README's ResNet-50 recipe, in place of those values
PAPER_RESNET = dict(optimizer="sgd", lr=0.03, weight_decay=1e-4, weight_decay_end=1e-4,
                    global_crops_scale=(0.14, 1.0), local_crops_scale=(0.05, 0.14))
HELP = {
    "arch": "ViT size (vit_tiny, vit_small, vit_base) or a torchvision ResNet (resnet50, the paper's convnet).",
    "patch_size": "Patch size in pixels: 8 gives better features at ~4x the cost of 16.",
    "depth": "Number of Transformer blocks (12 in the paper; fewer for a quick CPU run).",
    "out_dim": "K, the dimension of the DINO head output; large K (65536) helps on ImageNet.",
    "norm_last_layer": "Fix the norm of the last head layer to 1 (stabler; set False for better ViT-S results).",
    "use_bn_in_head": "BatchNorm in the hidden layers of the head (official option; off for ViTs; it did not help "
                      "the CPU recipe: docs/cpu_recipe.md). Statistics over the global batch on CUDA (SyncBatchNorm).",
    "momentum_teacher": "Base EMA momentum of the teacher, raised to 1 on a cosine. Raise it (0.9995) for small "
                        "batches; 0 makes the teacher a plain copy of the student (an ablation that collapses).",
    "centering": "How the teacher output is kept from collapsing to one dimension: ema (the centre of Eq. 4) or "
                 "sinkhorn (DINOv2's Sinkhorn-Knopp balancing of each batch; docs/cpu_recipe.md).",
    "koleo_weight": "Weight of DINOv2's KoLeo term, which spreads the student's [CLS] features within a batch (0: "
                    "off, as in DINO; DINOv2 uses 0.1).",
    "center_momentum": "EMA rate m of the centre c (Eq. 4); 0 centres on the previous batch's mean alone (small "
                       "batches, short runs: docs/cpu_recipe.md).",
    "warmup_teacher_temp": "Initial teacher temperature; lower it if the loss does not decrease at the start.",
    "teacher_temp": "Teacher temperature after warm-up. 0.04-0.07 in the paper (above 0.07 is unstable); the CPU "
                    "preset's 0.02 swings between the two collapses with the paper's --center_momentum 0.9.",
    "warmup_teacher_temp_epochs": "Epochs of linear teacher-temperature warm-up.",
    "weight_decay": "Initial weight decay (cosine schedule to --weight_decay_end).",
    "weight_decay_end": "Final weight decay.",
    "clip_grad": "Per-parameter gradient norm clip (official semantics); 0 disables.",
    "batch_size": "Images per process (GPU); the global batch is this times the number of processes.",
    "epochs": "Number of epochs; the schedules span them all.",
    "freeze_last_layer": "Epochs during which the last head layer gets no update (stabilises the start).",
    "lr": "Peak learning rate at batch 256, scaled linearly with the global batch: lr * batch / 256.",
    "warmup_epochs": "Epochs of linear learning-rate warm-up from 0.",
    "min_lr": "Learning rate at the end of the cosine schedule.",
    "drop_path_rate": "Stochastic depth of the student (the teacher has none).",
    "global_crops_scale": "Area range of the 2 global crops.",
    "local_crops_number": "Number of small local views; 0 disables multi-crop.",
    "local_crops_scale": "Area range of the local crops.",
    "global_size": "Side of the global crops in pixels.",
    "local_size": "Side of the local crops in pixels.",
    "blur_radius": "Gaussian blur radius range in pixels (scale it down for small crops).",
    "color_jitter": "Strength s of the colour jitter, ColorJitter(0.4s, 0.4s, 0.2s, 0.1s) with p 0.8 (1: the paper's).",
    "knn_every": "Online 20-NN accuracy of the teacher and the student on a held-back labelled split every N epochs "
                 "and after the last (0: never).",
    "stop_on_collapse": "Stop (exit code 3) when the teacher stayed collapsed for a whole epoch after the first; "
                        "off by default for the ablations --no_centering, --no_sharpening, --momentum_teacher 0 and "
                        "any --teacher but momentum.",
    "num_workers": "Data loading processes per training process (0 on 2 cores: workers would take the step's cores).",
    "optimizer": "adamw (the paper's, for ViTs), or for a convnet sgd (momentum 0.9) or lars (large batches).",
    "curriculum_epochs": "Speed lever, not the paper's: the first N epochs crop --curriculum_sizes, the rest "
                         "--global_size/--local_size (a resolution curriculum, FastDINOv2; 0: off).",
    "curriculum_sizes": "Global and local crop sides in pixels during the first --curriculum_epochs epochs.",
    "patch_drop": "Speed lever, not the paper's: the share of its global views' patches the student drops (MSN), "
                  "at the first and the last epoch, linear between; the teacher sees all (0 0: off).",
    "teacher": "Fig. 6's teachers: momentum (the EMA of the student, DINO's), student (a copy of it each step), "
               "previous_iter (the student before this step) or previous_epoch (the student at the last epoch's end).",
}
TEACHERS = ("momentum", "student", "previous_iter", "previous_epoch")


# ============ the command line ============
def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, help="Recipe the other flags default to (cpu for the embedded "
                   "data, paper for an image folder); explicit flags override it.")
    # One flag per key of PRESETS, its help from HELP with both presets' values; default None: the preset's, below.
    for k, v in PRESETS["paper"].items():
        names = {"patch_size": ["--patch", "--patch_size"], "batch_size": ["--batch_size", "--batch_size_per_gpu"]}
        also = f"; paper with a ResNet: {PAPER_RESNET[k]}" if k in PAPER_RESNET else ""
        kw = dict(default=None, help=f"{HELP[k]} (cpu: {PRESETS['cpu'][k]}; paper: {v}{also})")
        if isinstance(v, tuple):
            kw.update(nargs=len(v), type=type(v[0]))
        elif isinstance(v, bool):
            kw.update(type=lambda s: s.lower() in ("1", "true", "yes"))
        else:
            kw.update(type=type(v))
        p.add_argument(*names.get(k, [f"--{k}"]), dest=k, **kw)
    others = ", ".join(v for v in data.VARIANTS if v != data.DEFAULT_DATA)
    p.add_argument("--data", default=data.DEFAULT_DATA, help=f"'{data.DEFAULT_DATA}' (embedded, offline; also "
                   f"{others}) or an image folder of class sub-folders (labels are never used for training; "
                   "ROOT/train is used if present).")
    p.add_argument("--output_dir", default="out", help="Checkpoints and log; re-running in it resumes. A save that "
                   "fails (full disk, no permission) stops the run and keeps the last checkpoint.")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 autocast where the device supports it, else fp32. fp16 (GradScaler) is CUDA only.")
    p.add_argument("--no_centering", action="store_true", help="Ablation (Fig. 7): no centring; collapses to one-hot.")
    p.add_argument("--no_sharpening", action="store_true", help="Ablation (Fig. 7): teacher temperature = student "
                   "temperature; collapses to uniform.")
    p.add_argument("--exercise", nargs="+", default=[], metavar="NAME", help="Train with your own solutions of "
                   f"EXERCISES.md in place of the reference code ({' '.join(exercises.EXERCISES)}, or all); check "
                   "each first with python -m pytest --exercise NAME.")
    p.add_argument("--saveckp_freq", default=0, type=int,
                   help="Also keep checkpointNNNN.pth every N epochs (0: never).")
    p.add_argument("--stop_after_epoch", default=None, type=int, help="Save and stop after this epoch (for time-"
                   "limited jobs); re-run without it to continue.")
    p.add_argument("--seed", default=0, type=int, help="Random seed (weights, views, order).")
    p.add_argument("--log_every", default=10, type=int, help="Iterations between progress-bar updates.")
    args = p.parse_args(argv)
    args.preset = args.preset or ("cpu" if args.data in data.VARIANTS else "paper")
    ablation = args.no_centering or args.no_sharpening or args.momentum_teacher == 0 or \
        args.teacher not in (None, "momentum")  # Fig. 6's other teachers
    if args.stop_on_collapse is None and ablation:  # an ablation is run to watch the collapse happen
        args.stop_on_collapse = False
    resnet = {} if args.arch not in vit.RESNETS else {"patch_drop": (0.0, 0.0),  # a ViT lever; the official recipe
                                                       **(PAPER_RESNET if args.preset == "paper" else {})}
    for k, v in {**PRESETS[args.preset], **resnet}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("global_crops_scale", "local_crops_scale", "blur_radius", "curriculum_sizes", "patch_drop"):
        setattr(args, k, tuple(getattr(args, k)))
    if args.local_size > args.global_size:
        raise UserError(f"--local_size {args.local_size} is larger than --global_size {args.global_size}")
    for size in (args.global_size, args.local_size, *(args.curriculum_sizes if args.curriculum_epochs else ())):
        if size % args.patch_size and args.arch not in vit.RESNETS:  # a ResNet has no patches
            raise UserError(f"--patch {args.patch_size} does not divide the crop size {size}")
    if not all(0 <= r < 1 for r in args.patch_drop) or (any(args.patch_drop) and args.arch in vit.RESNETS):
        raise UserError(f"--patch_drop {' '.join(map(str, args.patch_drop))}: each fraction must be in [0, 1), and "
                        "0 0 for a ResNet (it has no patches to drop)")
    if args.centering not in ("ema", "sinkhorn"):
        raise UserError(f"unknown --centering {args.centering} (ema or sinkhorn)")
    if args.arch not in vit.ARCHS and args.arch not in vit.RESNETS:
        raise UserError(f"unknown --arch {args.arch} (choose from {', '.join(vit.ARCHS)} or a ResNet: resnet50, ...)")
    if args.teacher not in TEACHERS:
        raise UserError(f"unknown --teacher {args.teacher} (choose from {', '.join(TEACHERS)})")
    if args.optimizer not in ("adamw", "sgd", "lars"):
        raise UserError(f"unknown --optimizer {args.optimizer} (choose from adamw, sgd, lars)")
    if args.precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--precision fp16 needs CUDA; use bf16 or fp32 on CPU")
    return args


def presets_table():
    """The two recipes as a Markdown table (docs/cpu_recipe.md holds this exact text; a test checks they agree)."""
    rows = ["| flag | `--preset cpu` | `--preset paper` | what it does |", "|---|---|---|---|"]
    for k, v in PRESETS["paper"].items():
        fmt = lambda x: " ".join(map(str, x)) if isinstance(x, tuple) else str(x)
        rows.append(f"| `--{k}` | {fmt(PRESETS['cpu'][k])} | {fmt(v)} | {HELP[k]} |")
    return "\n".join(rows)


# ============ the views and the networks ============
class MultiCropDataset(Dataset):
    """The views of image i in epoch e come from a generator seeded with (seed, e, i): reproducible anywhere.
    An item is (image, its generator); `collate` makes the views of a whole batch at once (augment.py)."""

    def __init__(self, base, transform, seed):
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, _ = self.base[i]  # the label is never used for training
        return img, torch.Generator().manual_seed((self.seed * 10_000 + self.epoch) * 100_000_000 + i)

    def collate(self, items):
        """[(image, generator), ...] -> [global1, global2, local1, ...], uint8 (B, 3, H, W) each."""
        return self.transform.batch([img for img, _ in items], [g for _, g in items])


def multicrop_data(args, rank, world):
    """The training images, each giving 2 global + N local views, shuffled and sharded over the processes.
    Returns (dataset, sampler, iterations per epoch)."""
    transform = augment.MultiCropAugmentation(args.global_crops_scale, args.local_crops_scale,
                                              args.local_crops_number, args.global_size, args.local_size,
                                              args.blur_radius, args.color_jitter)
    dataset = MultiCropDataset(data.build_dataset(args.data, "train"), transform, args.seed)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    niter_per_ep = len(sampler) // args.batch_size
    if niter_per_ep == 0:
        raise UserError(f"--batch_size {args.batch_size} x {world} processes is more than the {len(dataset)} images")
    return dataset, sampler, niter_per_ep


class MultiCropWrapper(nn.Module):
    """g = head ∘ backbone, the network that the student and the teacher both are (Sec. 3.1). The backbone runs
    once per crop resolution (the global crops batched together, the local crops together), the head once."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops, return_features=False, drop_ratio=0.0):
        feats, start = [], 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape == crops[start].shape and (end != 2 or not drop_ratio):
                end += 1  # a run of crops of one size; the 2 global ones run alone when they drop patches
            x = torch.cat(crops[start:end])  # (n_crops_of_this_size·B, 3, H, W)
            if start == 0 and drop_ratio:  # the student's 2 global views lose patch tokens (vit.drop_patches)
                feats.append(self.backbone(x, drop_ratio=drop_ratio))  # (2·B, D)
            else:
                feats.append(self.backbone(x))  # (n_crops_of_this_size·B, D)
            start = end
        feats = torch.cat(feats)  # (n_crops·B, D) backbone [CLS] features, crops stacked view by view
        return (self.head(feats), feats) if return_features else self.head(feats)  # head: (n_crops·B, K)


def build_model(args, drop_path_rate):
    backbone = vit.backbone(args.arch, patch_size=args.patch_size, img_size=args.global_size, depth=args.depth,
                            drop_path_rate=drop_path_rate)  # a ResNet: torchvision's, with fc = nn.Identity()
    head = DINOHead(backbone.embed_dim, args.out_dim, use_bn=args.use_bn_in_head, norm_last_layer=args.norm_last_layer)
    return MultiCropWrapper(backbone, head)


def student_and_teacher(args, rank, device):
    """g = head ∘ backbone (Sec. 3.1), twice: the teacher starts as a copy of the student (head included), without
    drop-path or gradients. Returns (student, teacher, the student wrapped by DDP under torchrun, or itself)."""
    torch.manual_seed(args.seed)  # same init on every rank (DDP also broadcasts it)
    student = build_model(args, args.drop_path_rate).to(device)
    teacher = build_model(args, 0.0).to(device)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    if (args.use_bn_in_head or args.arch in vit.RESNETS) and dist.is_initialized() and device.type == "cuda":  # SyncBN
        student, teacher = map(nn.SyncBatchNorm.convert_sync_batchnorm, (student, teacher))
    student_ddp = DistributedDataParallel(student) if dist.is_initialized() else student  # the teacher needs none
    torch.manual_seed(args.seed + rank)  # from here: drop-path draws, different on every rank
    return student, teacher, student_ddp


# ============ optimisation: schedules, weight-decay groups, clipping, the momentum teacher ============
def cosine_schedule(base, final, epochs, niter_per_ep, warmup_epochs=0, start_warmup=0.0):
    """One value per iteration: linear warm-up from start_warmup to base, then cosine from base to final."""
    warmup = np.linspace(start_warmup, base, int(warmup_epochs * niter_per_ep))
    iters = np.arange(epochs * niter_per_ep - len(warmup))
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    return np.concatenate((warmup, cosine))[: epochs * niter_per_ep]


def schedules(args, niter_per_ep):
    """Sec. 3.2: lr linear warm-up to lr·B/256 ("linear scaling rule"), then cosine to min_lr; weight decay cosine
    0.04 → 0.4; teacher momentum cosine m → 1. Fig. 6's other teachers copy the student (m = 0): at every step, or at
    epoch ends only (previous_epoch: m = 1 within an epoch, the copy made by main)."""
    lr = cosine_schedule(args.lr * args.batch_size * args.world_size / 256, args.min_lr, args.epochs, niter_per_ep,
                         args.warmup_epochs)
    wd = cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, niter_per_ep)
    momentum = cosine_schedule(args.momentum_teacher, 1.0, args.epochs, niter_per_ep)
    if args.momentum_teacher == 0 or args.teacher != "momentum":
        momentum[:] = 1.0 if args.teacher == "previous_epoch" else 0.0
    return lr, wd, momentum


def crop_sizes(args, epoch):
    """(global, local) crop sides of this epoch: --curriculum_sizes in the first --curriculum_epochs (FastDINOv2)."""
    return tuple(args.curriculum_sizes) if epoch < args.curriculum_epochs else (args.global_size, args.local_size)


def patch_drop_ratio(args, epoch):
    """The share of patches the student drops from its global views: --patch_drop's first to last value, linear."""
    first, last = args.patch_drop
    return first + (last - first) * epoch / max(args.epochs - 1, 1)


def param_groups(model):
    """Weight decay on weight matrices (and cls_token/pos_embed), not on biases or norms (official groups)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(name, groups, device):
    """--optimizer (official): AdamW for ViTs (Sec. 3.2); SGD (momentum 0.9) or LARS (distributed.py) for convnets."""
    fused = device.type in ("cuda", "cpu")
    return {"adamw": lambda: torch.optim.AdamW(groups, lr=0.0, fused=fused), "lars": lambda: distributed.LARS(groups),
            "sgd": lambda: torch.optim.SGD(groups, lr=0.0, momentum=0.9)}[name]()  # fused: no (frozen layer)


@torch.no_grad()
def clip_gradients(model, clip):
    """Each parameter's gradient is rescaled to norm <= clip (official semantics), with no host sync."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    coefs = torch._foreach_add(torch._foreach_norm(grads), 1e-6)  # ||g|| + 1e-6
    torch._foreach_reciprocal_(coefs)
    torch._foreach_mul_(coefs, clip)
    torch._foreach_clamp_max_(coefs, 1.0)  # min(1, clip / (||g|| + 1e-6))
    torch._foreach_mul_(grads, coefs)


@torch.no_grad()
def update_teacher(teacher_params, student_params, m):
    """Momentum teacher (Sec. 3.1): θ_t ← m θ_t + (1 − m) θ_s, all parameters at once with _foreach ops."""
    torch._foreach_lerp_(teacher_params, student_params, 1 - m)  # θ_t + (1 − m)(θ_s − θ_t), one pass


# ============ the DINO step (Alg. 1) ============
def train_one_step(student, teacher, dino_loss, optimizer, scaler, autocast, crops, epoch, lr, wd, momentum, args):
    """One iteration of Alg. 1 on a batch of multi-crop views; returns the loss (a tensor: no host sync).

    `crops`: the views as the loader yields them, uint8 (B, 3, H, W) each, the 2 global ones first. `lr`, `wd`,
    `momentum`: this iteration's values of the schedules. `student` may be wrapped in DistributedDataParallel
    (its gradients are then averaged over the processes); `autocast` is the one mixed-precision context (disabled
    for fp32). `args` gives clip_grad, freeze_last_layer and koleo_weight."""
    net = student.module if isinstance(student, DistributedDataParallel) else student
    device = next(teacher.parameters()).device
    # --- DINO step ---
    # this iteration's learning rate and weight decay (Sec. 3.2: per-iteration cosine schedules)
    for i, pg in enumerate(optimizer.param_groups):
        pg["lr"] = float(lr)
        if i == 0:  # only the weight matrices are decayed
            pg["weight_decay"] = float(wd)
    crops = [augment.normalize(c.to(device, non_blocking=True)) for c in crops]  # uint8 -> float, ImageNet mean/std
    with autocast:
        # Alg. 1: t1, t2 = gt(x1), gt(x2); "only the global views are passed through the teacher"
        teacher_output = teacher(crops[:2])  # (2·B, K)
        # s = gs(x) for every view, the 2 global and the N local ones
        student_output, student_features = student(crops, return_features=True,  # (ncrops·B, K), (ncrops·B, D)
                                                   drop_ratio=patch_drop_ratio(args, epoch))
        # Eq. 3: min Σ_{x ∈ {x1, x2}} Σ_{x' ≠ x} H(P_t(x), P_s(x')), with P_t centred and sharpened (loss.py)
        loss = dino_loss(student_output, teacher_output, epoch)
        if args.koleo_weight:  # DINOv2: spread the [CLS] features of each global view over the batch
            globals_ = student_features[:teacher_output.shape[0]].chunk(2)  # 2 x (B, D)
            loss = loss + args.koleo_weight * sum(koleo_loss(f) for f in globals_)
    # back-propagate into the student only: the teacher has no gradients ("stop-gradient", Fig. 2)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if args.clip_grad:  # each parameter's gradient clipped to norm clip_grad (official semantics)
        scaler.unscale_(optimizer)
        clip_gradients(net, args.clip_grad)
    if epoch < args.freeze_last_layer:  # "freezing the last layer during the first epoch helps" (App.)
        for p in net.head.last_layer.parameters():
            p.grad = None
    teacher_params, student_params = list(teacher.parameters()), list(net.parameters())
    if args.teacher == "previous_iter":  # Fig. 6: the next step's teacher is the student before this step (m = 0)
        update_teacher(teacher_params, student_params, momentum)
    # AdamW step of the student (the scaler is a no-op unless --precision fp16)
    scaler.step(optimizer)
    scaler.update()
    # Alg. 1: gt.params = l * gt.params + (1 - l) * gs.params, the momentum teacher (--teacher student: m = 0)
    if args.teacher in ("momentum", "student"):
        update_teacher(teacher_params, student_params, momentum)
    # --- end of DINO step ---
    return loss.detach()


# ============ Alg. 1 with its data, networks and schedules ============
def main(args):
    exercises.install(args.exercise, error=UserError)  # EXERCISES.md: the student's functions, if any
    rank, world, device = distributed.init()  # one process (python) or one per GPU (torchrun)
    precision, args.world_size = resolve_precision(args.precision, device), world

    # data: 2 global + N local views per image (Sec. 3.1 "multi-crop"); labelled images for the online k-NN monitor
    dataset, sampler, niter_per_ep = multicrop_data(args, rank, world)
    knn_sets = eval_knn.monitor_datasets(args.data, args.global_size, 2500, 1000) if args.knn_every else None
    student, teacher, student_ddp = student_and_teacher(args, rank, device)  # same architecture, same weights
    # Eq. 3 with the centre c and the teacher temperature schedule (loss.py)
    dino_loss = DINOLoss(args.out_dim, 2 + args.local_crops_number, args.warmup_teacher_temp, args.teacher_temp,
                         args.warmup_teacher_temp_epochs, args.epochs, center_momentum=args.center_momentum,
                         centering="none" if args.no_centering else args.centering,
                         sharpening=not args.no_sharpening).to(device)
    # AdamW (Sec. 3.2), or SGD or LARS for a convnet; lr and weight decay are set every step from the schedules
    optimizer = build_optimizer(args.optimizer, param_groups(student), device)
    scaler, autocast = mixed_precision(precision, device)
    lr_schedule, wd_schedule, momentum_schedule = schedules(args, niter_per_ep)  # one value per iteration

    parts = dict(student=student, teacher=teacher, optimizer=optimizer, scaler=scaler, dino_loss=dino_loss)
    it, history, resumed_sums = resume(args.output_dir, parts, args, niter_per_ep, rank)  # mid-epoch included
    if it >= args.epochs * niter_per_ep:
        return print_once(rank, f"training already finished ({args.epochs} epochs) in {args.output_dir}; use "
                          "another --output_dir to train again")
    stop = catch_stop_signals()  # Ctrl-C or SIGTERM (a cluster's time limit): save at a step boundary, then exit
    print_once(rank, f"{vit.describe(vars(args))}, K={args.out_dim}, {dino_loss.ncrops} crops, {len(dataset)} "
               f"images, {world} process(es) x {args.batch_size}, {precision} on {device}, {args.epochs} epochs")
    args.num_workers = loader_workers(args.num_workers, rank)
    for epoch in range(it // niter_per_ep, args.epochs):
        done = it - epoch * niter_per_ep  # iterations of this epoch already run (mid-epoch resume)
        if args.teacher == "previous_epoch" and done == 0:  # Fig. 6: the student as the last epoch left it
            update_teacher(list(teacher.parameters()), list(student.parameters()), 0.0)
        meter = EpochMeter(device, resumed_sums if done else None)  # resumed midway: the log covers the whole epoch
        bar = tqdm(epoch_loader(dataset, sampler, epoch, done, args, device), total=niter_per_ep, initial=done,
                   desc=f"epoch {epoch}", disable=rank != 0, dynamic_ncols=True, leave=False)
        for crops in bar:  # crops: [global1, global2, local1, ...], uint8 (B, 3, H, W) each
            loss = train_one_step(student_ddp, teacher, dino_loss, optimizer, scaler, autocast, crops, epoch,
                                  lr_schedule[it], wd_schedule[it], momentum_schedule[it], args)
            meter.add(loss, dino_loss.stats, it, crops[0].shape[0] * world)
            it += 1
            if it % args.log_every == 0:
                meter.check_finite(niter_per_ep, args.output_dir)  # the one host sync, at intervals
                if rank == 0:
                    bar.set_postfix(meter.postfix(loss, dino_loss.stats))
            if stop_requested(stop, it, args.log_every, device):
                break
        bar.close()
        meter.check_finite(niter_per_ep, args.output_dir)
        if it % niter_per_ep:  # a signal mid-epoch: save where the run is, with the epoch's running sums, and exit
            save_and_exit(training_state(parts, it, niter_per_ep, args, history, meter.sums), args.output_dir,
                          epoch, stop, rank)
        # the epoch's log line: mean loss, teacher entropy and KL (Fig. 7), the schedules' values, speed
        log = {"epoch": epoch, **meter.means(), "lr": float(lr_schedule[it - 1]), "wd": float(wd_schedule[it - 1]),
               "momentum": float(momentum_schedule[it - 1]), "teacher_temp": dino_loss.teacher_temp(epoch),
               "img_per_s": meter.img_per_s()}
        if args.knn_every and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs):
            with autocast:  # the features in the training precision, stored in fp32; the student too (Fig. 6)
                log["knn_top1"] = eval_knn.monitor_top1(teacher.backbone, *knn_sets, device=device)
                log["knn_top1_student"] = eval_knn.monitor_top1(student.backbone, *knn_sets, device=device)
        history.append(log)
        save_run(training_state(parts, it, niter_per_ep, args, history, None), args.output_dir, rank,
                 args.saveckp_freq)  # checkpoint.pth, then log.txt rewritten from its history
        print_once(rank, " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in log.items()))
        stop_if_collapsed(log, args, rank)  # a collapsed teacher stops the run, with advice
        if args.stop_after_epoch is not None and epoch >= args.stop_after_epoch:
            print_once(rank, f"stopped after epoch {epoch} as asked; re-run without --stop_after_epoch to continue")
            break
        if stop_requested(stop, it, 1, device):  # a signal in the epoch's last step: exit once it is logged and saved
            save_and_exit(None, args.output_dir, epoch, stop, rank)
    return student, teacher, dino_loss


# ============ the plumbing of main: the precision, an epoch's batches ============
def resolve_precision(precision, device):
    if precision == "auto":
        ok = torch.cuda.is_bf16_supported() if device.type == "cuda" else torch.ops.mkldnn._is_mkldnn_bf16_supported()
        precision = "bf16" if ok else "fp32"
    return precision


def mixed_precision(precision, device):
    """One mixed-precision path: (a GradScaler that only fp16 needs, autocast in bf16 or fp16 or disabled)."""
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast = torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16,
                              enabled=precision in ("bf16", "fp16"))
    return scaler, autocast


def epoch_loader(dataset, sampler, epoch, done, args, device):
    """This epoch's batches, in this epoch's shuffled order, from batch `done` on (a mid-epoch resume skips what
    was trained). The views are drawn per (seed, epoch, image): a resumed epoch gets the same ones."""
    sampler.set_epoch(epoch)
    dataset.epoch = epoch
    dataset.transform.global_size, dataset.transform.local_size = crop_sizes(args, epoch)
    indices = list(sampler)[done * args.batch_size:]
    return DataLoader(dataset, batch_size=args.batch_size, sampler=indices, num_workers=args.num_workers,
                      collate_fn=dataset.collate, drop_last=True, pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(args.seed + epoch))


if __name__ == "__main__":
    try:
        main(get_args())
    except (UserError, data.DataError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
