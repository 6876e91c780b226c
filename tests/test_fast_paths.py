"""The fast paths compute what the plain (official) code computes: attention, loss, clipping, EMA, AdamW, the whole
step, torch.compile, and the tensor augmentation against PIL/torchvision. Correctness only; speed is benchmark.py's."""
import copy

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter

import augment
import benchmark
import train
import vit
from loss import DINOLoss


def tiny_args(*extra):
    return train.get_args(["--preset", "paper", "--arch", "vit_tiny", "--patch", "8", "--depth", "1",
                           "--global_size", "32", "--local_size", "16", "--local_crops_number", "2",
                           "--out_dim", "64", "--batch_size", "4", *extra])


def test_sdpa_attention_equals_the_explicit_softmax_attention_and_its_gradients():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 16, requires_grad=True) for _ in range(3))  # (B, heads, N, d)
    fast = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    slow = ((q * 16 ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v  # softmax(q k^T / sqrt(d)) v
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    grads_fast = torch.autograd.grad(fast.square().sum(), (q, k, v))
    grads_slow = torch.autograd.grad(slow.square().sum(), (q, k, v))
    for a, b in zip(grads_fast, grads_slow):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_our_attention_module_equals_the_official_one():
    torch.manual_seed(0)
    attn = vit.Attention(48, num_heads=3)
    x = torch.randn(2, 17, 48, requires_grad=True)
    ours, official = attn(x), benchmark.explicit_attention(attn, x)
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(*(torch.autograd.grad(y.square().sum(), x)[0] for y in (ours, official)),
                               rtol=1e-4, atol=1e-5)


def test_attention_under_cpu_bf16_autocast_takes_the_explicit_path_and_matches_fp32(monkeypatch):
    # on CPU under bf16 autocast the (N, N) matrix is written out (faster there); the result must still be the
    # fp32 attention up to bf16 rounding, gradients included
    torch.manual_seed(0)
    attn = vit.Attention(48, num_heads=3)
    x = torch.randn(4, 17, 48, requires_grad=True)
    reference = benchmark.explicit_attention(attn, x)
    monkeypatch.setattr(vit.F, "scaled_dot_product_attention", None)  # calling the fused kernel would fail
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = attn(x)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), reference, rtol=0.05, atol=0.02)
    g_ours, g_ref = (torch.autograd.grad(y.float().square().sum(), x)[0] for y in (ours, reference))
    torch.testing.assert_close(g_ours, g_ref, rtol=0.05, atol=0.05)


def test_forward_only_attention_under_cpu_bf16_autocast_takes_sdpa_and_matches_fp32(monkeypatch):
    # the teacher's and evaluation's calls need no backward: there the fused kernel (faster forward) runs; the
    # written-out product must not, and the result is still the fp32 attention up to bf16 rounding
    torch.manual_seed(0)
    attn = vit.Attention(48, num_heads=3).requires_grad_(False)  # as the teacher
    x = torch.randn(4, 17, 48)
    reference = benchmark.explicit_attention(attn, x)
    calls = []
    sdpa = vit.F.scaled_dot_product_attention
    monkeypatch.setattr(vit.F, "scaled_dot_product_attention", lambda *a: calls.append(1) or sdpa(*a))
    monkeypatch.setattr(torch.Tensor, "softmax", None)  # the written-out path would call it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = attn(x)
        with torch.no_grad():  # evaluation: a trainable module under no_grad is forward-only too
            attn.requires_grad_(True)
            ours_no_grad = attn(x)
    assert len(calls) == 2 and ours.dtype == torch.bfloat16
    for y in (ours, ours_no_grad):
        torch.testing.assert_close(y.float(), reference, rtol=0.05, atol=0.02)


def test_official_double_loop_loss_equals_ours_and_updates_the_same_center():
    torch.manual_seed(0)
    ncrops, B, K = 5, 3, 32
    ours, official = (cls(K, ncrops, 0.04, 0.07, 2, 10) for cls in (DINOLoss, benchmark.OfficialDINOLoss))
    for epoch in range(3):  # three calls: the centre (updated after each) enters the next loss
        student, teacher = torch.randn(ncrops * B, K), torch.randn(2 * B, K)
        torch.testing.assert_close(ours(student, teacher, epoch), official(student, teacher, epoch))
        torch.testing.assert_close(ours.center, official.center)


def test_clipping_without_host_syncs_equals_the_per_parameter_loop():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    reference = copy.deepcopy(model)
    x = torch.randn(5, 8)
    for m in (model, reference):
        m(x).square().sum().mul(100).backward()  # large gradients: some are clipped, some not
    train.clip_gradients(model, 3.0)
    benchmark.official_clip_gradients(reference, 3.0)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    assert max(p.grad.norm().item() for p in model.parameters()) <= 3.0 + 1e-4


def test_foreach_ema_equals_the_python_loop_over_parameters():
    torch.manual_seed(0)
    student = [torch.randn(3, 4), torch.randn(7), torch.randn(2, 2, 2)]
    teacher = [torch.randn_like(p) for p in student]
    expected = [t.clone() for t in teacher]
    m = 0.996
    for param_q, param_k in zip(student, expected):
        param_k.mul_(m).add_((1 - m) * param_q)
    train.update_teacher(teacher, student, m)
    for t, e in zip(teacher, expected):
        torch.testing.assert_close(t, e)


def test_fused_adamw_equals_the_default_adamw_on_the_dino_param_groups():
    torch.manual_seed(0)
    model = train.build_model(tiny_args(), 0.0)
    reference = copy.deepcopy(model)
    opts = [torch.optim.AdamW(train.param_groups(m), lr=1e-3, **kw) for m, kw in [(model, {"fused": True}),
                                                                                   (reference, {})]]
    for step in range(3):
        for m, opt in zip((model, reference), opts):
            opt.param_groups[0]["weight_decay"] = 0.04 + 0.1 * step
            torch.manual_seed(step)
            opt.zero_grad()
            m([torch.randn(2, 3, 32, 32)]).square().mean().backward()
            opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_our_step_and_the_official_step_give_the_same_losses_in_fp32():
    """Same weights, crops and drop-path draws: the second loss depends on the clipped AdamW update, the EMA teacher
    and the centre of the first step, so the whole step matches the official one."""
    losses = []
    for official in (False, True):
        step = benchmark.make_step(tiny_args(), torch.device("cpu"), "fp32", official=official)[0]
        losses.append([float(step()) for _ in range(3)])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_the_benchmark_times_train_py_s_own_step(monkeypatch):
    calls, step = [], train.train_one_step
    monkeypatch.setattr(train, "train_one_step", lambda *a, **kw: calls.append(1) or step(*a, **kw))
    benchmark.make_step(tiny_args(), torch.device("cpu"), "fp32")[0]()
    assert calls == [1]


def test_the_matmul_only_time_replays_every_matmul_of_forward_and_backward():
    # a linear layer's forward (addmm) and backward (two mm: input and weight gradients): three calls, each re-run
    lin, x = torch.nn.Linear(8, 4), torch.randn(5, 8, requires_grad=True)
    run = lambda: lin(x).square().sum().backward()
    with benchmark.RecordMatmuls() as rec:
        run()
    assert sorted(str(func) for func, _, _ in rec.calls) == ["aten.addmm.default", "aten.mm.default", "aten.mm.default"]
    assert 0 < benchmark.matmul_only_seconds(run, torch.device("cpu"), reps=1) < 1


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's mallopt and /proc")
def test_freed_memory_is_kept_so_a_reallocated_tensor_does_not_page_fault_again():
    import resource
    import distributed
    if not distributed.keep_freed_memory():
        pytest.skip("not glibc")
    faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: no worker's small allocation lands next to the block and splits it off
    try:
        for _ in range(2):  # the first round may grow the heap; from then on the same 64 MB block is reused
            torch.empty(16 * 2 ** 20).fill_(1.0)
        before = faults()
        torch.empty(16 * 2 ** 20).fill_(1.0)  # 16,384 pages of 4 KB if it came fresh from the kernel (glibc default)
        assert faults() - before < 1000
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_compiled_backbone_equals_eager_forward_and_backward():
    torch.manual_seed(0)
    eager = vit.vit_tiny(patch_size=8, img_size=32, depth=2)
    compiled = copy.deepcopy(eager)
    compiled.compile(dynamic=False)
    for size in (32, 16):  # a global and a local resolution: one graph each
        x = torch.randn(3, 3, size, size)
        out_e, out_c = eager(x), compiled(x)
        torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-4)
        out_e.square().sum().backward()
        out_c.square().sum().backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4, msg=name)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints keep the official keys


# ---- augmentation: tensor operations against torchvision's (float tensors) and PIL's definitions ----
def crop_image(seed=0, size=48):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def as_float(img):
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float()  # (3, H, W) in [0, 255]


@pytest.mark.parametrize("op, reference, factor", [
    (augment.adjust_brightness, TF.adjust_brightness, 1.3), (augment.adjust_contrast, TF.adjust_contrast, 0.7),
    (augment.adjust_saturation, TF.adjust_saturation, 1.2), (augment.adjust_hue, TF.adjust_hue, 0.08),
    (augment.adjust_hue, TF.adjust_hue, -0.1)])
def test_colour_jitter_operations_equal_torchvision(op, reference, factor):
    x = as_float(crop_image())
    torch.testing.assert_close(op(x.clone(), factor), reference(x / 255, factor) * 255, rtol=0, atol=2e-2)


@pytest.mark.parametrize("sigma", [0.1, 0.7, 1.3, 2.0])
def test_blur_is_pils_gaussian_blur_up_to_rounding(sigma):
    img = benchmark.sample_image().resize((40, 30), Image.BICUBIC)
    ours = augment.gaussian_blur(as_float(img)[None], *augment.box_radius(sigma))[0].round()
    pil = as_float(img.filter(ImageFilter.GaussianBlur(sigma)))
    # PIL rounds to 8 bits after each of its 6 passes, we round once at the end
    assert (ours - pil).abs().max() <= 3 and (ours - pil).abs().mean() < 0.6


def test_fast_resize_is_pils_bicubic_up_to_rounding():
    img = benchmark.sample_image()
    box, size = (37, 20, 337, 290), 96
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None]  # channels-last, as in MultiCropAugmentation
    ours = torch.nn.functional.interpolate(x[..., box[1]:box[3], box[0]:box[2]].contiguous(
        memory_format=torch.channels_last), size=(size, size), mode="bicubic", antialias=True)[0].float()
    pil = as_float(img.resize((size, size), Image.BICUBIC, box=box))
    assert (ours - pil).abs().mean() < 0.1 and ((ours - pil).abs() > 1).float().mean() < 0.02


def test_fast_multicrop_gives_full_range_uint8_views_of_the_right_shapes():
    aug = augment.MultiCropAugmentation(local_crops_number=4)
    crops = aug(benchmark.sample_image(), torch.Generator().manual_seed(0))
    assert [tuple(c.shape) for c in crops] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 4
    assert all(c.dtype == torch.uint8 and c.is_contiguous() for c in crops)
    assert all(c.float().std() > 5 for c in crops)  # real images, not blank
    pixels = torch.cat([c.flatten() for c in crops])
    assert pixels.min() < 30 and pixels.max() > 225  # the colour operations keep the whole [0, 255] range


def test_views_keep_the_official_grayscale_probability():
    aug = augment.MultiCropAugmentation(local_crops_number=1, global_size=16, local_size=8)
    img, g = crop_image(2, 32), torch.Generator().manual_seed(0)
    views = [aug(img, g) for _ in range(300)]
    gray = np.mean([bool((v[2][0] == v[2][1]).all() and (v[2][1] == v[2][2]).all()) for v in views])
    assert 0.13 < gray < 0.27  # RandomGrayscale(p=0.2) on every view
