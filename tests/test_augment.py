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
    for name in ("adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue"):
        def record(x, f, name=name, op=getattr(augment, name)):
            seen.setdefault(name, []).append(f)
            return op(x, f)
        monkeypatch.setattr(augment, name, record)
    aug = MultiCropAugmentation(local_crops_number=8, global_size=16, local_size=8, color_jitter=s)
    for i in range(60):
        aug(image(32, 32), torch.Generator().manual_seed(i))
    jitter = T.ColorJitter(0.4 * s, 0.4 * s, 0.2 * s, min(0.1 * s, 0.5))
    for name, (lo, hi) in [("adjust_brightness", jitter.brightness), ("adjust_contrast", jitter.contrast),
                           ("adjust_saturation", jitter.saturation), ("adjust_hue", jitter.hue)]:
        f = np.array(seen[name])
        assert lo <= f.min() and f.max() <= hi
        assert f.min() < lo + 0.1 * (hi - lo) and f.max() > hi - 0.1 * (hi - lo)  # the whole range is drawn
