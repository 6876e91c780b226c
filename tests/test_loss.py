"""loss.py: Eq. 1-3 and the centre EMA of Sec. 3.1; the two collapse modes of Fig. 7 on toy logits.

Exercise: comment out the centring (or the sharpening) in loss.py and watch the collapse tests fail.
"""
import math

import numpy as np
import pytest
import torch

from loss import DINOLoss, koleo_loss, sinkhorn_knopp, teacher_temp_schedule


def direct_eq3(student, teacher, center, ncrops, tau_s, tau_t):
    """Eq. 3 written as a plain double loop, one image at a time."""
    B = teacher.shape[0] // 2
    s = student.view(ncrops, B, -1)
    t = teacher.view(2, B, -1)
    total, pairs = 0.0, 0
    for i in range(2):
        for v in range(ncrops):
            if v == i:
                continue
            per_image = []
            for b in range(B):
                p_t = torch.softmax((t[i, b] - center[0]) / tau_t, -1)
                log_p_s = torch.log_softmax(s[v, b] / tau_s, -1)
                per_image.append(-(p_t * log_p_s).sum())
            total += torch.stack(per_image).mean()
            pairs += 1
    return total / pairs


def test_loss_equals_a_direct_evaluation_of_eq3_over_three_steps_with_the_centre():
    torch.manual_seed(0)
    K, ncrops, B = 7, 4, 3
    loss_fn = DINOLoss(K, ncrops, 0.04, 0.07, 2, 5)
    center = torch.zeros(1, K)
    for epoch in range(3):
        student, teacher = torch.randn(ncrops * B, K), torch.randn(2 * B, K) + 2
        tau_t = [0.04, 0.07, 0.07][epoch]
        expected = direct_eq3(student, teacher, center, ncrops, 0.1, tau_t)
        torch.testing.assert_close(loss_fn(student, teacher, epoch), expected)
        # c <- m c + (1 - m) mean(g_t), applied from the next step on
        center = 0.9 * center + 0.1 * teacher.mean(0, keepdim=True)
        torch.testing.assert_close(loss_fn.center, center)


def test_the_loss_stays_in_fp32_under_bf16_autocast():
    """Autocast runs matmuls (einsum) in bf16: the loss of logits computed in bf16 is still reckoned in fp32, as the
    official code's elementwise sum is (a bf16 loss near 10 is a multiple of 1/16)."""
    torch.manual_seed(0)
    student, teacher = torch.randn(4 * 8, 64), torch.randn(2 * 8, 64)
    expected = DINOLoss(64, 4, 0.04, 0.04, 0, 1)(student, teacher, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = DINOLoss(64, 4, 0.04, 0.04, 0, 1)(student, teacher, 0)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected)


def test_a_view_is_never_its_own_target():
    torch.manual_seed(0)
    K, B = 5, 2
    student = torch.randn(3 * B, K, requires_grad=True)
    teacher = torch.randn(2 * B, K)
    DINOLoss(K, 3, 0.04, 0.04, 0, 1)(student, teacher, 0).backward()
    grad_before = student.grad[:B].clone()  # student view 0 is compared to teacher view 1 only
    student.grad = None
    teacher[:B] = torch.randn(B, K) * 10  # change teacher view 0
    DINOLoss(K, 3, 0.04, 0.04, 0, 1)(student, teacher, 0).backward()
    torch.testing.assert_close(student.grad[:B], grad_before)


def test_the_centre_is_the_ema_of_raw_teacher_logits_and_starts_at_zero():
    K = 4
    loss_fn = DINOLoss(K, 2, 0.04, 0.04, 0, 1, center_momentum=0.9)
    assert loss_fn.center.shape == (1, K) and (loss_fn.center == 0).all()
    teacher = torch.tensor([[1.0, 2, 3, 4], [3.0, 2, 1, 0]])
    loss_fn(torch.zeros(2, K), teacher, 0)
    torch.testing.assert_close(loss_fn.center, 0.1 * torch.tensor([[2.0, 2, 2, 2]]))


def test_with_centre_momentum_0_the_centre_is_the_last_batch_mean():
    K = 4
    loss_fn = DINOLoss(K, 2, 0.04, 0.04, 0, 1, center_momentum=0.0)
    for teacher in (torch.tensor([[1.0, 2, 3, 4], [3.0, 2, 1, 0]]), torch.tensor([[0.0, 0, 8, 0], [0.0, 4, 0, 0]])):
        loss_fn(torch.zeros(2, K), teacher, 0)
        torch.testing.assert_close(loss_fn.center, teacher.mean(0, keepdim=True))


def test_teacher_temperature_warms_up_linearly_then_stays_constant():
    sched = teacher_temp_schedule(0.04, 0.07, 30, 100)
    assert len(sched) == 100 and sched[0] == 0.04 and sched[29] == pytest.approx(0.07) and sched[-1] == 0.07
    assert np.all(np.diff(sched[:30]) > 0)
    loss_fn = DINOLoss(8, 2, 0.04, 0.07, 30, 10)  # warm-up longer than training: clamps, never crashes
    assert loss_fn.teacher_temp(50) == pytest.approx(loss_fn.teacher_temps[-1])


def toy_teacher_entropy(centering, sharpening, steps=60):
    """Teacher logits where one dimension dominates for every image (the start of a collapse)."""
    torch.manual_seed(0)
    K, B = 64, 16
    loss_fn = DINOLoss(K, 2, 0.04, 0.04, 0, 1, centering=centering, sharpening=sharpening)
    for _ in range(steps):
        teacher = 0.05 * torch.randn(2 * B, K)
        teacher[:, 0] += 1.0  # dimension 0 dominates
        loss_fn(torch.randn(2 * B, K), teacher, 0)
    return loss_fn.stats["teacher_entropy"].item(), math.log(K)


def test_centering_alone_drives_the_teacher_towards_uniform():
    h, log_k = toy_teacher_entropy(centering=True, sharpening=False)
    assert h > 0.95 * log_k


def test_sharpening_alone_drives_the_teacher_towards_one_hot():
    h, log_k = toy_teacher_entropy(centering=False, sharpening=True)
    assert h < 0.05 * log_k


def test_centering_and_sharpening_together_stay_in_between():
    h, log_k = toy_teacher_entropy(centering=True, sharpening=True)
    assert 0.05 * log_k < h < 0.95 * log_k


def test_collapse_statistics_kl_is_cross_entropy_minus_teacher_entropy():
    torch.manual_seed(0)
    loss_fn = DINOLoss(6, 2, 0.04, 0.04, 0, 1)
    student, teacher = torch.randn(4, 6), torch.randn(4, 6)
    loss = loss_fn(student, teacher, 0)
    pt = torch.softmax(teacher / 0.04, -1)
    h = -torch.special.xlogy(pt, pt).sum(-1).mean()
    torch.testing.assert_close(loss_fn.stats["teacher_entropy"], h)
    torch.testing.assert_close(loss_fn.stats["kl"], loss - h)
    assert loss_fn.stats["kl"] >= 0


def sinkhorn_reference(teacher_output, temp, iters=3):
    """DINOv2's sinkhorn_knopp_teacher, transcribed as written there (single process)."""
    Q = torch.exp(teacher_output / temp).t()  # (K, B)
    B, K = Q.shape[1], Q.shape[0]
    Q /= Q.sum()
    for _ in range(iters):
        Q /= Q.sum(dim=1, keepdim=True)
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def test_sinkhorn_matches_dinov2s_transcription_and_rows_are_distributions():
    torch.manual_seed(0)
    t = torch.randn(12, 9)
    pt = sinkhorn_knopp(t, 0.5)
    torch.testing.assert_close(pt, sinkhorn_reference(t, 0.5))
    torch.testing.assert_close(pt.sum(1), torch.ones(12))


def test_sinkhorn_balances_a_dimension_that_dominates_every_image():
    """The start of the one-hot collapse: softmax gives dimension 0 most of the mass of every image; Sinkhorn-Knopp
    gives every prototype about the same share of the batch, B / K, as the centre does only slowly."""
    torch.manual_seed(0)
    B, K = 32, 8
    t = torch.randn(B, K) * 0.02
    t[:, 0] += 0.2
    assert torch.softmax(t / 0.04, -1)[:, 0].mean() > 0.9
    mass = sinkhorn_knopp(t, 0.04).sum(0)  # (K,) mass of each prototype over the batch
    torch.testing.assert_close(mass, torch.full((K,), B / K), rtol=0.05, atol=0)


def test_sinkhorn_does_not_overflow_or_divide_by_zero_at_small_temperatures():
    t = torch.randn(16, 64)
    t[:, 3] += 5.0
    pt = sinkhorn_knopp(t, 0.01)  # exp(5 / 0.01) overflows without the max subtraction
    assert torch.isfinite(pt).all() and torch.allclose(pt.sum(1), torch.ones(16))


def test_sinkhorn_centering_leaves_the_centre_alone_and_gives_the_same_loss_shape():
    torch.manual_seed(0)
    loss_fn = DINOLoss(16, 4, 0.04, 0.04, 0, 1, centering="sinkhorn")
    loss = loss_fn(torch.randn(4 * 5, 16), torch.randn(2 * 5, 16) + 3, 0)
    assert loss.ndim == 0 and torch.isfinite(loss) and torch.count_nonzero(loss_fn.center) == 0
    with pytest.raises(ValueError, match="centering"):
        DINOLoss(16, 4, 0.04, 0.04, 0, 1, centering="median")


def test_koleo_is_large_when_two_features_coincide_and_its_gradient_pulls_them_apart():
    torch.manual_seed(0)
    x = torch.randn(8, 5)
    spread = koleo_loss(x)
    x[1] = x[0] + 1e-3 * torch.randn(5)
    assert koleo_loss(x) > spread + 1.0  # -log of a tiny distance
    x.requires_grad_(True)
    koleo_loss(x).backward()
    step = x - 0.01 * x.grad  # one step of gradient descent
    assert torch.dist(step[0], step[1]) > torch.dist(x[0], x[1])
