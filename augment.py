"""Multi-crop augmentation (paper Sec. 3.1 and App. "Multi-crop"; BYOL's colour/blur/solarize recipe).

From each image DINO makes 2 global views (224 px, 40-100% of the image) and N local views (96 px, 5-40%).
The teacher sees only the global views, the student sees all of them, so the student must predict from a small
patch what the teacher sees in a large one: "local-to-global" correspondence.

    aug = MultiCropAugmentation(local_crops_number=8)   # 224/96 for ImageNet; 64/32 for the embedded data
    crops = aug(pil_image)          # [global1, global2, local1, ..., local8], uint8 tensors (3, H, W)
    x = normalize(batch_of_crops)    # on the device: float, ImageNet mean/std

Each view: random resized crop (bicubic) -> flip (p 0.5) -> colour jitter (p 0.8; brightness 0.4, contrast 0.4,
saturation 0.2, hue 0.1, in a random order) -> grayscale (p 0.2) -> Gaussian blur -> solarize (official
`DataAugmentationDINO`). Choices that differ from the official code without changing the distribution of the views:
- the image becomes a uint8 tensor once; each crop is resized by torch's antialiased bicubic kernel (PIL's filter,
  several times faster), the colour operations run on the small float crop (exact HSV hue rotation instead of
  PIL's 8-bit HSV round trip) and the blur is PIL's three box passes written as tensor ops: about 3x faster per
  image than the official PIL pipeline (`python benchmark.py`), the same views up to 8-bit rounding;
- crops stay uint8 until they reach the device (4x less data from the loader workers; `normalize` there);
- every random draw comes from a `torch.Generator` passed in, so a sample's views are a pure function of
  (seed, epoch, index): a run resumed mid-epoch sees exactly the views of an uninterrupted one.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LUMA = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601-2 luma, as PIL's convert("L") and torchvision's grayscale


def normalize(x):
    """uint8 (B, 3, H, W) -> float32 with ImageNet mean/std (what ToTensor + Normalize give)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def to_uint8_tensor(img):
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()  # (3, H, W)


def random_resized_crop_box(width, height, scale, g, ratio=(3 / 4, 4 / 3)):
    """(left, top, right, bottom) of a random crop covering `scale` of the area with aspect ratio in `ratio`
    (the rule of torchvision's RandomResizedCrop: 10 tries, then a centre crop)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for u_area, u_ratio, u_top, u_left in torch.rand(10, 4, generator=g, dtype=torch.float64).tolist():  # one draw
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u_ratio)
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(u_top * (height - h + 1)), int(u_left * (width - w + 1))  # uniform integer offsets
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


# ---- colour operations on a float (3, H, W) crop with values in [0, 255] (torchvision's definitions) ----
def grayscale(x):
    return (LUMA @ x.view(3, -1)).view(1, *x.shape[1:])  # (1, H, W)


def adjust_brightness(x, factor):
    return x.mul_(factor).clamp_(0, 255)


def adjust_contrast(x, factor):  # blend with the mean grey level of the image
    mean = LUMA @ x.mean((1, 2))  # 0-d
    return x.mul_(factor).add_(mean * (1 - factor)).clamp_(0, 255)


def adjust_saturation(x, factor):  # blend with the image's own grayscale
    gray = grayscale(x)
    return x.mul_(factor).add_(gray, alpha=1 - factor).clamp_(0, 255)


HUE_OFFSETS = torch.tensor([2.0, 5 / 3, 4 / 3]).view(3, 1, 1)  # R, G, B phases (+1 turn: keeps frac positive)


def adjust_hue(x, factor):
    """Rotate the HSV hue by `factor` turns, keeping saturation and value (max and min of R, G, B) exactly.

    Written with arithmetic only (no per-pixel branches, which are slow on tensors): the one-hot of the largest
    channel picks the textbook hue formula, and HSV -> RGB is the trapezoid form
    channel = min + chroma · clamp(|6·frac(hue + phase) - 3| - 1, 0, 1)."""
    r, g, b = x
    maxc, minc = x.amax(0), x.amin(0)
    chroma = maxc - minc  # (H, W)
    is_r = (r == maxc).float()
    is_g = (g == maxc).float().mul_(1 - is_r)
    is_b = 1 - is_r - is_g  # one-hot of the (first) largest channel
    # hue in turns: (g - b)/C if R is the largest, (2 + (b - r)/C) if G, (4 + (r - g)/C) if B; all / 6
    h6 = is_r * (g - b) + is_g * (b - r).add_(chroma, alpha=2) + is_b * (r - g).add_(chroma, alpha=4)
    h = h6.div_(chroma.clamp_min(1e-3).mul_(6))  # grey pixels (chroma 0) get hue 0 and stay grey
    t = (h + factor + HUE_OFFSETS).frac_().mul_(6).sub_(3).abs_().sub_(1).clamp_(0, 1)  # (3, H, W)
    return torch.addcmul(minc, chroma, t)


def box_blur(x, radius, dim):
    """One pass of PIL's box blur along `dim`: weight 1 on 2l+1 centre taps, r-l on the two next ones, edges
    replicated (r = l + fraction; the whole sum divided by 2r + 1)."""
    l, n = int(radius), x.shape[dim]
    edge = list(x.shape)
    edge[dim] = l + 1
    first, last = x.narrow(dim, 0, 1).expand(edge), x.narrow(dim, n - 1, 1).expand(edge)
    xp = torch.cat([first, x, last], dim)  # (3, H, W) with n + 2l + 2 along dim
    centre = xp.narrow(dim, 1, n)
    for j in range(2, 2 * l + 2):
        centre = centre + xp.narrow(dim, j, n)
    far = xp.narrow(dim, 0, n) + xp.narrow(dim, 2 * l + 2, n)
    return torch.add(centre, far, alpha=radius - l).mul_(1 / (2 * radius + 1))


def gaussian_blur(x, sigma, passes=3):
    """PIL's ImageFilter.GaussianBlur(sigma): `passes` box blurs along each axis (Gwosdek et al. 2011)."""
    sigma2 = sigma * sigma / passes
    L = math.sqrt(12.0 * sigma2 + 1.0)  # box length with the same variance
    l = math.floor((L - 1.0) / 2.0)
    a = (2 * l + 1) * (l * (l + 1) - 3 * sigma2) / (6 * (sigma2 - (l + 1) * (l + 1)))  # fractional part
    for dim in (2, 1):
        for _ in range(passes):
            x = box_blur(x, l + a, dim)
    return x


def _factor(strength, u):
    """ColorJitter's factor for a strength: uniform on [max(0, 1 - strength), 1 + strength], u uniform on [0, 1)."""
    lo = max(0.0, 1 - strength)
    return lo + (1 + strength - lo) * u


class MultiCropAugmentation:
    def __init__(self, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4), local_crops_number=8,
                 global_size=224, local_size=96, blur_radius=(0.1, 2.0), color_jitter=1.0):
        self.color_jitter = color_jitter  # strength s: ColorJitter(0.4s, 0.4s, 0.2s, 0.1s); 1 is the paper's
        self.global_crops_scale = global_crops_scale
        self.local_crops_scale = local_crops_scale
        self.local_crops_number = local_crops_number
        self.global_size = global_size
        self.local_size = local_size
        self.blur_radius = blur_radius

    def view(self, img, size, scale, blur_p, solarize_p, g):
        """One view of img, a (1, 3, H, W) uint8 tensor: crop, flip, colour jitter, grayscale, blur, solarize."""
        left, top, right, bottom = random_resized_crop_box(img.shape[-1], img.shape[-2], scale, g)
        u = torch.rand(14, generator=g, dtype=torch.float64).tolist()  # every other draw of this view
        # crop and resize in one resampling pass; antialiased bicubic as PIL's resize (uint8 in, uint8 out)
        crop = F.interpolate(img[..., top:bottom, left:right], size=(size, size), mode="bicubic", antialias=True)
        x = crop[0].to(torch.float32, memory_format=torch.contiguous_format)  # (3, size, size)
        if u[1] < 0.8:  # ColorJitter(0.4s, 0.4s, 0.2s, 0.1s): random strengths, random order
            s = self.color_jitter
            ops = [(adjust_brightness, _factor(0.4 * s, u[2])), (adjust_contrast, _factor(0.4 * s, u[3])),
                   (adjust_saturation, _factor(0.2 * s, u[4])), (adjust_hue, min(0.1 * s, 0.5) * (2 * u[5] - 1))]
            for i in sorted(range(4), key=lambda i: u[6 + i]):  # a uniformly random permutation
                x = ops[i][0](x, ops[i][1])
        if u[10] < 0.2:
            x = grayscale(x).expand(3, -1, -1)
        if u[11] < blur_p:
            lo, hi = self.blur_radius
            x = gaussian_blur(x, lo + (hi - lo) * u[12])
        x = x.round().clamp_(0, 255).to(torch.uint8)
        if u[13] < solarize_p:
            x = torch.where(x >= 128, 255 - x, x)  # ImageOps.solarize(threshold=128)
        # every operation above is mirror-symmetric, so flipping last is the same as flipping first
        return x.flip(-1) if u[0] < 0.5 else x.contiguous()

    def __call__(self, img, generator=None):
        g = generator if generator is not None else torch.default_generator
        pixels = torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8))  # (H, W, 3), as PIL stores it
        img = pixels.permute(2, 0, 1)[None]  # (1, 3, H, W) channels-last: the layout of the fast uint8 resize
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
