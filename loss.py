"""The DINO loss: cross-entropy between a centred, sharpened teacher and the student (paper Sec. 3.1, Eq. 1-3).

For an image x with global views {x1g, x2g} and all views V (globals + locals):

    P_s(x)   = softmax(g_s(x) / τ_s)                       (Eq. 1, student)
    P_t(x)   = softmax((g_t(x) - c) / τ_t)                 (Eq. 1 with centring, teacher)
    loss     = Σ_{x ∈ {x1g,x2g}} Σ_{x' ∈ V, x' ≠ x} H(P_t(x), P_s(x'))   averaged over the pairs     (Eq. 3)
    c       ← m c + (1 - m) · mean_batch g_t(x)            ("Avoiding collapse", Eq. 4)

Centring (subtracting c) stops one dimension from dominating but pushes P_t towards uniform; sharpening (τ_t < τ_s)
does the opposite. Used together they avoid both collapses (Fig. 7). This module also reports the two collapse
statistics of Fig. 7: the teacher entropy h(P_t) and KL(P_t ‖ P_s) = H(P_t, P_s) - h(P_t), averaged like the loss.
"""
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def teacher_temp_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs):
    """τ_t per epoch: linear warm-up over the first epochs, then constant (Sec. 3.2, App. Table 9)."""
    warmup = np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)
    return np.concatenate((warmup, np.full(max(nepochs - warmup_teacher_temp_epochs, 0), teacher_temp)))


class DINOLoss(nn.Module):
    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs,
                 student_temp=0.1, center_momentum=0.9, centering=True, sharpening=True):
        super().__init__()
        self.ncrops = ncrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering = centering  # --no_centering: ablation of Fig. 7 (sharpening alone collapses to one-hot)
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
        # P_t = softmax((g_t - c) / τ_t)
        center = self.center if self.centering else torch.zeros_like(self.center)
        pt = F.softmax((teacher_output - center) / self.teacher_temp(epoch), dim=-1).detach()
        pt = pt.view(2, B, -1)  # (2, B, K)
        # H(P_t(x_i), P_s(x_v)) averaged over the batch, for every teacher view i and student view v
        ce = -torch.einsum("ibk,vbk->iv", pt, log_ps) / B  # (2, V)
        # Eq. 3: sum over pairs with x_v ≠ x_i (a view is never its own target), divided by the number of pairs
        # (the pairs x_v = x_i are the diagonal ce[0, 0], ce[1, 1]; no boolean mask, which would sync with the GPU)
        loss = (ce.sum() - ce.diagonal().sum()) / (2 * (self.ncrops - 1))
        with torch.no_grad():
            # h(P_t) = -Σ_k P_t log P_t; every teacher view enters ncrops-1 pairs, so its mean is averaged like
            # the loss, and the mean KL over pairs is mean H(P_t, P_s) - mean h(P_t)
            entropy = -torch.special.xlogy(pt, pt).sum(-1).mean()  # 0·log 0 = 0
            self.stats = {"teacher_entropy": entropy, "kl": loss.detach() - entropy}
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
