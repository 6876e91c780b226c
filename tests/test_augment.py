"""augment.py: multi-crop (Sec. 3.1): 2 global + N local views, each image with its own random draws."""
import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from augment import MultiCropAugmentation, eval_transform, normalize, random_resized_crop_box


def image(w=120, h=90, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_multicrop_returns_two_global_and_n_local_uint8_crops_of_the_requested_sizes():
    crops = MultiCropAugmentation(local_crops_number=3, global_size=64, local_size=32)(image())
    assert [tuple(c.shape) for c in crops] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 3
    assert all(c.dtype == torch.uint8 for c in crops)


def test_views_are_a_pure_function_of_the_generator_and_differ_between_draws():
    aug = MultiCropAugmentation(local_crops_number=2, global_size=48, local_size=24)
    a = aug(image(), torch.Generator().manual_seed(7))
    b = aug(image(), torch.Generator().manual_seed(7))
    c = aug(image(), torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert not torch.equal(a[0], a[1])  # the two global views have their own random parameters


def test_random_resized_crop_covers_the_requested_area_fraction_and_aspect():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        left, top, right, bottom = random_resized_crop_box(500, 375, (0.05, 0.4), g)
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 500 and 0 <= top < bottom <= 375
        assert 0.04 < w * h / (500 * 375) < 0.42 and 0.7 < w / h < 1.4


def test_small_images_still_give_full_size_crops():
    crops = MultiCropAugmentation(local_crops_number=1, global_size=64, local_size=32)(image(20, 12))
    assert crops[0].shape == (3, 64, 64) and crops[2].shape == (3, 32, 32)
    assert eval_transform(64)(image(20, 12)).shape == (3, 64, 64)


def test_normalize_equals_to_tensor_then_imagenet_normalize():
    img = image()
    reference = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])(img)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None]
    torch.testing.assert_close(normalize(x)[0], reference)


def test_eval_transform_resizes_by_256_over_224_then_centre_crops():
    t = eval_transform(224)
    assert t.resize == 256 and t(image(500, 375)).shape == (3, 224, 224)
    assert eval_transform(64).resize == 73


@pytest.mark.parametrize("s", [1.0, 2.0, 3.0])
def test_colour_jitter_strength_draws_factors_on_torchvision_colorjitter_ranges(s, monkeypatch):
    """--color_jitter s is T.ColorJitter(0.4s, 0.4s, 0.2s, 0.1s): brightness on [max(0, 1 - 0.4s), 1 + 0.4s], hue
    on [-min(0.1s, 0.5), min(0.1s, 0.5)]; s = 1 is the paper's ColorJitter(0.4, 0.4, 0.2, 0.1)."""
    import augment
    seen = {}

    def recording(op):
        def record(x, f):
            seen.setdefault(op.__name__, []).extend(torch.as_tensor(f).flatten().tolist())  # one factor per crop
            return op(x, f)
        return record
    monkeypatch.setattr(augment, "JITTER", tuple(recording(op) for op in augment.JITTER))
    aug = MultiCropAugmentation(local_crops_number=8, global_size=16, local_size=8, color_jitter=s)
    for i in range(60):
        aug(image(32, 32), torch.Generator().manual_seed(i))
    jitter = T.ColorJitter(0.4 * s, 0.4 * s, 0.2 * s, min(0.1 * s, 0.5))
    for name, (lo, hi) in [("adjust_brightness", jitter.brightness), ("adjust_contrast", jitter.contrast),
                           ("adjust_saturation", jitter.saturation), ("adjust_hue", jitter.hue)]:
        f = np.array(seen[name])
        assert lo <= f.min() and f.max() <= hi
        assert f.min() < lo + 0.1 * (hi - lo) and f.max() > hi - 0.1 * (hi - lo)  # the whole range is drawn


def reference_view(img, plan, size):
    """One view made straight from its plan, one operation after another (the official order), as a check on the
    batched path: img a PIL image, plan an augment.ViewPlan."""
    import augment
    left, top, right, bottom = plan.box
    pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None]
    x = torch.nn.functional.interpolate(pixels[..., top:bottom, left:right], size=(size, size), mode="bicubic",
                                        antialias=True).float()
    for k, factor in plan.jitter:
        x = augment.JITTER[k](x, factor)
    if plan.gray:
        x = augment.grayscale(x).expand_as(x)
    if plan.blur:
        x = augment.gaussian_blur(x, *augment.box_radius(plan.blur))
    x = x.round().clamp(0, 255)
    if plan.solarize:
        x = torch.where(x >= 128, 255 - x, x)  # ImageOps.solarize(threshold=128)
    if plan.flip:
        x = x.flip(-1)
    return x[0].to(torch.uint8)


def assert_same_up_to_rounding(a, b):
    diff = (a.int() - b.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3  # float rounding moves a rare pixel by one level


@pytest.mark.parametrize("chunk_pixels", [1, 1 << 18])
def test_a_batch_gives_every_view_its_own_plan_applied_in_order(chunk_pixels, monkeypatch):
    """aug.batch runs each operation once on all the crops that take it; each view must still be its own plan
    applied in order (colour operations in the drawn order, then grayscale, blur, solarize, flip), whatever the
    images' sizes and however the crops are chunked (1 pixel: one crop at a time)."""
    import augment
    monkeypatch.setattr(augment, "CHUNK_PIXELS", chunk_pixels)
    aug = MultiCropAugmentation(local_crops_number=6, global_size=40, local_size=24)  # the paper's blur radii
    images = [image(120, 90, 0), image(50, 70, 1), image(64, 64, 2), image(33, 90, 3)] * 3
    seeds = range(len(images))
    views = aug.batch(images, [torch.Generator().manual_seed(s) for s in seeds])
    assert [tuple(v.shape) for v in views] == [(len(images), 3, 40, 40)] * 2 + [(len(images), 3, 24, 24)] * 6
    plans = []
    for i, (img, s) in enumerate(zip(images, seeds)):
        plan = aug.plan(img.width, img.height, torch.Generator().manual_seed(s))
        for j, p in enumerate(plan):
            assert_same_up_to_rounding(views[j][i], reference_view(img, p, 40 if j < 2 else 24))
        plans += plan
    # the check covers what it is about: every branch, both integer blur radii, many jitter orders
    assert all(any(getattr(p, k) for p in plans) and not all(getattr(p, k) for p in plans)
               for k in ("flip", "gray", "blur", "solarize", "jitter"))
    assert {augment.box_radius(p.blur)[0] for p in plans if p.blur} == {0, 1}
    assert len({tuple(k for k, _ in p.jitter) for p in plans if p.jitter}) >= 12


def test_an_image_gets_the_same_views_alone_and_in_a_batch():
    aug = MultiCropAugmentation(local_crops_number=3, global_size=32, local_size=16)
    images = [image(120, 90, 0), image(40, 30, 1), image(64, 64, 2)]
    batch = aug.batch(images, [torch.Generator().manual_seed(10 + i) for i in range(3)])
    for i, img in enumerate(images):
        for j, view in enumerate(aug(img, torch.Generator().manual_seed(10 + i))):
            assert_same_up_to_rounding(batch[j][i], view)
