"""Exercise 4: the momentum teacher, an exponential moving average of the student (paper Sec. 3.1 "Teacher
network", Alg. 1; Sec. 5.2, Table 6).

Write `update_teacher` below; it replaces `update_teacher` of train.py, called after every optimizer step.
Check it:  python -m pytest --exercise teacher
"""
import torch


@torch.no_grad()
def update_teacher(teacher_params, student_params, m):
    """θ_t <- m θ_t + (1 - m) θ_s for every parameter, in place. Replaces `train.update_teacher`.

    Arguments:
        teacher_params  list of tensors: the teacher's parameters, updated in place (they have no gradient)
        student_params  list of tensors of the same shapes, in the same order: the student's, read only
        m               float, the momentum (train.py raises it from 0.996 to 1 on a cosine over training)
        returns         nothing

    Alg. 1:  teacher.params = l * teacher.params + (1 - l) * student.params

    The teacher is never trained by gradients, only by this average: it is an ensemble of past students and gives
    better targets than the student itself (with m = 0 the teacher is a copy of the student, and training collapses).
    Hint, speed (DESIGN.md §7): a Python loop over the parameters launches two small kernels per tensor (a ViT-S
    has ~150 tensors); torch._foreach_mul_(tensors, scalar) and torch._foreach_add_(tensors, other_tensors,
    alpha=...) each do a whole list in one call, and torch._foreach_lerp_(a, b, w) computes a + w·(b - a) in one.
    A test counts the kernels.
    """
    raise NotImplementedError
