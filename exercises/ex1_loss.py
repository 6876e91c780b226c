"""Exercise 1: the DINO loss, a cross-entropy over pairs of views (paper Sec. 3.1, Eq. 1-3).

Write `forward` below; it replaces `DINOLoss.forward` of loss.py (read its __init__ for the attributes you have).
Check it:  python -m pytest --exercise loss
"""
import torch
import torch.nn.functional as F


def forward(self, student_output, teacher_output, epoch):
    """The DINO loss of one batch. Replaces `loss.DINOLoss.forward`.

    Shapes (B images, K output dimensions, V = self.ncrops views of each image):
        student_output  (V·B, K)  student logits g_s(x') of every view, stacked view by view: rows v·B ... v·B+B-1
                                  are view v of the B images; views 0 and 1 are the two global crops
        teacher_output  (2·B, K)  teacher logits g_t(x) of the two global views, stacked the same way
        epoch           int       the teacher temperature depends on it
        returns         ()        the loss, a 0-d tensor; gradients flow into student_output only

    Equations (Sec. 3.1):
        P_s(x')  = softmax(g_s(x') / τ_s)              τ_s = self.student_temp (0.1)                      Eq. 1
        P_t(x)   = softmax((g_t(x) - c) / τ_t)         c = self.center (1, K), τ_t = self.teacher_temp(epoch)
        H(a, b)  = - Σ_k a_k log b_k                   averaged over the B images of the batch
        loss     = Σ_{x ∈ {x1g, x2g}} Σ_{x' ∈ V, x' ≠ x} H(P_t(x), P_s(x'))   /  (number of pairs)      Eq. 3
    A view is never its own target: teacher view 0 is compared with every student view but 0, teacher view 1 with
    every student view but 1, so there are 2·(V - 1) pairs.

    Also:
    - P_t is a target: no gradient flows into the teacher (detach it);
    - self.centering says what c is: "ema", the centre above, which is then updated with this batch's raw teacher
      logits for the next step: self.update_center(teacher_output) (exercise 2); "none", c = 0 and no update (the
      --no_centering ablation of Fig. 7); "sinkhorn" is DINOv2's replacement of the centre, not part of this
      exercise: P_t = loss.sinkhorn_knopp(teacher_output, τ_t), no update;
    - set self.stats = {"teacher_entropy": h, "kl": loss - h}, 0-d tensors without gradient, where h is the mean
      over the 2·B teacher rows of -Σ_k P_t log P_t (train.py logs both: the collapse curves of Fig. 7).

    Hints: F.log_softmax is stabler than log(softmax(·)). `.view(V, B, K)` or `.chunk(V)` splits the views. A double
    loop over (teacher view, student view) is fine (torch.einsum("ibk,vbk->iv", ...) does every pair at once).
    torch.special.xlogy(p, p) is p·log p with 0·log 0 = 0. Do the maths in fp32: under bf16 autocast the logits
    arrive in bf16 (`.float()`).
    """
    raise NotImplementedError
