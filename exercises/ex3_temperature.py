"""Exercise 3: the teacher temperature, the sharpening that balances the centring (paper Sec. 3.1, 3.2, App.).

Write `teacher_temp_schedule` below; it replaces `teacher_temp_schedule` of loss.py, which DINOLoss calls once to
get τ_t per epoch (DINOLoss.teacher_temp(epoch) reads it, clamping epochs past its end to the last value).
Check it:  python -m pytest --exercise temperature
"""
import numpy as np


def teacher_temp_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs):
    """τ_t for every epoch: linear warm-up, then constant. Replaces `loss.teacher_temp_schedule`.

    Arguments: floats warmup_teacher_temp (0.04 in the paper), teacher_temp (0.04-0.07), ints
    warmup_teacher_temp_epochs (30) and nepochs (100).
    Returns a 1-d numpy array, one temperature per epoch: nepochs values, or warmup_teacher_temp_epochs if the
    warm-up is longer than training.

        epochs 0 ... W-1:   from warmup_teacher_temp to teacher_temp in equal steps, both ends included (W values)
        epochs W ... :      teacher_temp
    (W = warmup_teacher_temp_epochs; with W = 0 every epoch gets teacher_temp.)

    Why: the teacher's softmax((g_t - c) / τ_t) with τ_t < τ_s = 0.1 is sharper than the student's. Sharpening alone
    collapses to one dimension, centring alone to a uniform output; together they balance (Fig. 7). A low τ_t at the
    start, raised slowly, keeps the first epochs stable (above 0.07 training is unstable, App. Table 9).
    Hints: np.linspace(a, b, n) gives n values from a to b included; np.full(n, v); np.concatenate.
    """
    raise NotImplementedError
