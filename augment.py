"""Multi-crop augmentation (paper Sec. 3.1 and App. "Multi-crop"; BYOL's colour/blur/solarize recipe).

From each image DINO makes 2 global views (224 px, 40-100% of the image) and N local views (96 px, 5-40%).
The teacher sees only the global views, the student sees all of them, so the student must predict from a small
patch what the teacher sees in a large one: "local-to-global" correspondence.

    aug = MultiCropAugmentation(local_crops_number=8)   # 224/96 for ImageNet; 64/32 for the embedded data
    crops = aug(pil_image)          # [global1, global2, local1, ..., local8], uint8 tensors (3, H, W)
    x = normalize(batch_of_crops)    # on the device: float, ImageNet mean/std

Two choices that differ from the official code without changing the distribution of the views:
- crops stay uint8 until they reach the device (4x less data from the loader workers; `normalize` there);
- every random draw comes from a `torch.Generator` passed in, so a sample's views are a pure function of
  (seed, epoch, index): a run resumed mid-epoch sees exactly the views of an uninterrupted one.
"""
import math

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(x):
    """uint8 (B, 3, H, W) -> float32 with ImageNet mean/std (what ToTensor + Normalize give)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def to_uint8_tensor(img):
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()  # (3, H, W)


def uniform(g, lo, hi):
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def random_resized_crop_box(width, height, scale, g, ratio=(3 / 4, 4 / 3)):
    """(left, top, right, bottom) of a random crop covering `scale` of the area with aspect ratio in `ratio`
    (the rule of torchvision's RandomResizedCrop: 10 tries, then a centre crop)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * uniform(g, *scale)
        aspect = math.exp(uniform(g, *log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=g))
            left = int(torch.randint(0, width - w + 1, (), generator=g))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def color_jitter(img, g, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
    """ColorJitter(0.4, 0.4, 0.2, 0.1): the four adjustments in a random order, each with a random strength."""
    factors = [uniform(g, 1 - brightness, 1 + brightness), uniform(g, 1 - contrast, 1 + contrast),
               uniform(g, 1 - saturation, 1 + saturation), uniform(g, -hue, hue)]
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in torch.randperm(4, generator=g).tolist():
        img = ops[i](img, factors[i])
    return img


class MultiCropAugmentation:
    def __init__(self, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4), local_crops_number=8,
                 global_size=224, local_size=96, blur_radius=(0.1, 2.0)):
        self.global_crops_scale = global_crops_scale
        self.local_crops_scale = local_crops_scale
        self.local_crops_number = local_crops_number
        self.global_size = global_size
        self.local_size = local_size
        self.blur_radius = blur_radius

    def view(self, img, size, scale, blur_p, solarize_p, g):
        """One view: random resized crop (bicubic) -> flip -> colour jitter -> grayscale -> blur -> solarize."""
        box = random_resized_crop_box(img.width, img.height, scale, g)
        img = img.resize((size, size), Image.BICUBIC, box=box)  # crop and resize in one resampling pass
        if torch.rand((), generator=g) < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if torch.rand((), generator=g) < 0.8:
            img = color_jitter(img, g)
        if torch.rand((), generator=g) < 0.2:
            img = img.convert("L").convert("RGB")
        if torch.rand((), generator=g) < blur_p:
            img = img.filter(ImageFilter.GaussianBlur(radius=uniform(g, *self.blur_radius)))
        if torch.rand((), generator=g) < solarize_p:
            img = ImageOps.solarize(img, threshold=128)
        return to_uint8_tensor(img)

    def __call__(self, img, generator=None):
        g = generator if generator is not None else torch.default_generator
        img = img.convert("RGB")
        crops = [self.view(img, self.global_size, self.global_crops_scale, 1.0, 0.0, g),  # global 1: always blurred
                 self.view(img, self.global_size, self.global_crops_scale, 0.1, 0.2, g)]  # global 2: solarized
        for _ in range(self.local_crops_number):
            crops.append(self.view(img, self.local_size, self.local_crops_scale, 0.5, 0.0, g))
        return crops


class eval_transform:
    """Evaluation view: resize the short side to size·256/224 (bicubic), centre-crop `size`, uint8 tensor.

    A class rather than a closure so that DataLoader workers can pickle it under any start method."""

    def __init__(self, size, resize=None):
        self.size, self.resize = size, resize or int(round(size * 256 / 224))

    def __call__(self, img):
        img = TF.resize(img.convert("RGB"), self.resize, interpolation=TF.InterpolationMode.BICUBIC)
        return to_uint8_tensor(TF.center_crop(img, self.size))
