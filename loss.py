"""The DINO loss: cross-entropy between a centred, sharpened teacher and the student (paper Sec. 3.1, Eq. 1-3).

For an image x with global views {x1g, x2g} and all views V (globals + locals):

    P_s(x)   = softmax(g_s(x) / τ_s)                       (Eq. 1, student)
    P_t(x)   = softmax((g_t(x) - c) / τ_t)                 (Eq. 1 with centring, teacher)
    loss     = Σ_{x ∈ {x1g,x2g}} Σ_{x' ∈ V, x' ≠ x} H(P_t(x), P_s(x'))   averaged over the pairs     (Eq. 3)
    c       ← m c + (1 - m) · mean_batch g_t(x)            ("Avoiding collapse", Eq. 4)

Centring (subtracting c) stops one dimension from dominating but pushes P_t towards uniform; sharpening (τ_t < τ_s)
does the opposite. Used together they avoid both collapses (Fig. 7). This module also reports the two collapse
statistics of Fig. 7: the teacher entropy h(P_t) and KL(P_t ‖ P_s) = H(P_t, P_s) - h(P_t), averaged like the loss.

`centering="sinkhorn"` replaces the centre by the Sinkhorn-Knopp normalisation of DINOv2 (Oquab et al. 2023,
Sec. 4, from SwAV): P_t is rescaled, within the global batch, so that every prototype receives the same total mass.
`koleo_loss` is DINOv2's KoLeo regulariser, which the CPU preset adds to the loss (docs/cpu_recipe.md).
`stop_if_collapsed` reads an epoch's mean teacher entropy (train.py's log line) and stops a collapsed run with advice.
"""
import math
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def teacher_temp_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs):
    """τ_t per epoch: linear warm-up over the first epochs, then constant (Sec. 3.2, App. Table 9)."""
    warmup = np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)
    return np.concatenate((warmup, np.full(max(nepochs - warmup_teacher_temp_epochs, 0), teacher_temp)))


def _all_reduce(t, op=None):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=3):
    """P_t for (B, K) teacher logits with, over the global batch, mass 1/K per prototype and 1/B per image.

    Q = exp(g_t / τ_t), then alternately each prototype's column is scaled to total 1/K over the images and each
    image's row to total 1/B (DINOv2's `sinkhorn_knopp_teacher`, 3 iterations), returned as B·Q: rows sum to 1.
    Done on log Q, so that no temperature overflows or underflows exp (same numbers otherwise)."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    B, K = teacher_output.shape[0] * world, teacher_output.shape[1]
    log_q = teacher_output.float() / teacher_temp  # (B_local, K)
    for _ in range(n_iterations):
        # each prototype: Σ_b Q_bk = 1/K, the sum running over the global batch (log-sum-exp across processes)
        top = _all_reduce(log_q.max(dim=0, keepdim=True).values, dist.ReduceOp.MAX if world > 1 else None)
        mass = _all_reduce(torch.exp(log_q - top).sum(dim=0, keepdim=True))  # (1, K)
        log_q = log_q - top - mass.log() - math.log(K)
        # each image: Σ_k Q_bk = 1/B
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(B)
    return torch.exp(log_q + math.log(B))  # (B_local, K), each row a distribution over the K prototypes


class DINOLoss(nn.Module):
    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs,
                 student_temp=0.1, center_momentum=0.9, centering=True, sharpening=True):
        super().__init__()
        self.ncrops = ncrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        # "ema": the centre of Eq. 4; "sinkhorn": DINOv2's batch balancing; "none" (or False): --no_centering, the
        # ablation of Fig. 7 (sharpening alone collapses to one-hot). True means "ema".
        self.centering = {True: "ema", False: "none"}.get(centering, centering)
        if self.centering not in ("ema", "sinkhorn", "none"):
            raise ValueError(f"unknown centering {centering!r} (ema, sinkhorn or none)")
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temps = teacher_temp_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs,
                                                   nepochs)
        if not sharpening:  # --no_sharpening: τ_t = τ_s (centring alone collapses to uniform)
            self.teacher_temps = np.full_like(self.teacher_temps, student_temp)
        self.stats = {}  # collapse statistics of the last call, as 0-d tensors (no host sync here)

    def teacher_temp(self, epoch):
        return float(self.teacher_temps[min(epoch, len(self.teacher_temps) - 1)])

    def forward(self, student_output, teacher_output, epoch):
        """student_output: (ncrops·B, K) logits, crops stacked view by view; teacher_output: (2·B, K)."""
        student_output, teacher_output = student_output.float(), teacher_output.float()  # loss maths in fp32
        B = teacher_output.shape[0] // 2
        # log P_s = log_softmax(g_s / τ_s)
        log_ps = F.log_softmax(student_output / self.student_temp, dim=-1).view(self.ncrops, B, -1)  # (V, B, K)
        if self.centering == "sinkhorn":  # P_t = Sinkhorn-Knopp(exp(g_t / τ_t)): balanced over the batch
            pt = sinkhorn_knopp(teacher_output, self.teacher_temp(epoch))
        else:  # P_t = softmax((g_t - c) / τ_t)
            center = self.center if self.centering == "ema" else torch.zeros_like(self.center)
            pt = F.softmax((teacher_output - center) / self.teacher_temp(epoch), dim=-1).detach()
        pt = pt.view(2, B, -1)  # (2, B, K)
        # H(P_t(x_i), P_s(x_v)) averaged over the batch, for every teacher view i and student view v; autocast would
        # run this product in bf16/fp16 (einsum is a matmul) and round the loss to 3 digits: it stays in fp32
        with torch.autocast(log_ps.device.type, enabled=False):
            ce = -torch.einsum("ibk,vbk->iv", pt, log_ps) / B  # (2, V)
        # Eq. 3: sum over pairs with x_v ≠ x_i (a view is never its own target), divided by the number of pairs
        # (the pairs x_v = x_i are the diagonal ce[0, 0], ce[1, 1]; no boolean mask, which would sync with the GPU)
        loss = (ce.sum() - ce.diagonal().sum()) / (2 * (self.ncrops - 1))
        with torch.no_grad():
            # h(P_t) = -Σ_k P_t log P_t; every teacher view enters ncrops-1 pairs, so its mean is averaged like
            # the loss, and the mean KL over pairs is mean H(P_t, P_s) - mean h(P_t)
            entropy = -torch.special.xlogy(pt, pt).sum(-1).mean()  # 0·log 0 = 0
            self.stats = {"teacher_entropy": entropy, "kl": loss.detach() - entropy}
        if self.centering == "ema":
            self.update_center(teacher_output)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        """c ← m c + (1 - m) · mean of the raw teacher logits over the global batch (Eq. 4)."""
        batch_center = teacher_output.sum(dim=0, keepdim=True)  # (1, K)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            world = dist.get_world_size()
        batch_center = batch_center / (len(teacher_output) * world)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


def koleo_loss(features, eps=1e-8):
    """DINOv2's KoLeo regulariser (Sec. 4, after Sablayrolles et al. 2019) on a batch of student [CLS] features:

        L_koleo = -1/n Σ_i log(d_i),   d_i = min_{j ≠ i} ||x_i - x_j||,   x = features / ||features||

    It grows when two images get the same feature, so it pushes the features of a batch apart: the opposite of the
    collapse to a uniform teacher, where every image has the same output."""
    x = F.normalize(features.float(), dim=-1, eps=eps)  # (n, D) on the unit sphere
    with torch.no_grad():
        dots = x @ x.t()  # (n, n) cosine similarities
        dots.fill_diagonal_(-2.0)  # an image is not its own neighbour
        nearest = dots.argmax(dim=1)  # (n,) index of each image's nearest neighbour
    return -torch.log(F.pairwise_distance(x, x[nearest], eps=eps) + eps).mean()


def collapse_kind(entropy, out_dim):
    """Fig. 7: a mean teacher entropy near 0 is the collapse to one dimension, near log K the collapse to uniform."""
    log_k = math.log(out_dim)
    return "one-hot" if entropy < 0.05 * log_k else "uniform" if entropy > 0.98 * log_k else None


COLLAPSE_ADVICE = {
    "one-hot": "every image maps to the same dimension (sharpening not balanced by centring); try --centering "
               "sinkhorn, a higher --teacher_temp or a lower --lr",
    "uniform": "the teacher output is uniform (centring not balanced by sharpening); try --koleo_weight 0.1 (the "
               "cpu preset's, measured in docs/cpu_recipe.md) or higher, or a lower --teacher_temp",
}


def stop_if_collapsed(log, args, rank):
    """Warn when the teacher stayed collapsed for a whole epoch after the first; exit 3 with --stop_on_collapse.
    `log`: the epoch's log line (its mean teacher entropy); only the first process (rank 0) prints."""
    epoch = log["epoch"]
    kind = collapse_kind(log["teacher_entropy"], args.out_dim) if epoch >= 1 else None
    if not kind:
        return
    if rank == 0:
        print(f"warning: teacher collapsed ({kind}, mean entropy {log['teacher_entropy']:.3f} of log K = "
              f"{math.log(args.out_dim):.3f} over epoch {epoch}): {COLLAPSE_ADVICE[kind]}", file=sys.stderr)
    if args.stop_on_collapse:
        if rank == 0:
            print(f"stopped: the teacher collapsed; the checkpoint of epoch {epoch} is in {args.output_dir} "
                  "(--stop_on_collapse false trains on regardless)", file=sys.stderr)
        sys.exit(3)
