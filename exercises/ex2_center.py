"""Exercise 2: the centre, an EMA of the teacher's outputs that keeps one dimension from winning (paper Sec. 3.1,
"Avoiding collapse", Eq. 4).

Write `update_center` below; it replaces `DINOLoss.update_center` of loss.py.
Check it:  python -m pytest --exercise center
"""
import torch
import torch.distributed as dist


@torch.no_grad()
def update_center(self, teacher_output):
    """c <- m·c + (1 - m)·(mean of the raw teacher logits over the batch). Replaces `loss.DINOLoss.update_center`.

    Shapes:
        teacher_output  (2·B, K)  raw teacher logits g_t(x) of both global views (before centring and temperature)
        self.center     (1, K)    the buffer c, zero at the start; update it (in place, or assign a new (1, K) tensor)
        returns         nothing
    m = self.center_momentum (0.9 in the paper; the CPU preset uses 0: the centre is then the last batch's mean).

    Eq. 4:   c <- m c + (1 - m) · (1 / 2B) Σ_i g_t(x_i)      the mean over the rows of teacher_output

    Subtracting c before the teacher's softmax stops one dimension from dominating for every image (collapse to
    one-hot), but pushes the teacher towards uniform; the sharpening of exercise 3 does the opposite.
    Distributed training: the mean is over the global batch. Sum the rows, and when
    dist.is_available() and dist.is_initialized(), dist.all_reduce that sum and divide by rows x dist.get_world_size()
    (without a process group, just divide by the number of rows).
    Hint: keep the (1, K) shape (keepdim=True); the decorator already turns gradients off.
    """
    raise NotImplementedError
