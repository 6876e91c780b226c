"""Multi-crop augmentation (paper Sec. 3.1 and App. "Multi-crop"; BYOL's colour/blur/solarize recipe).

From each image DINO makes 2 global views (224 px, 40-100% of the image) and N local views (96 px, 5-40%).
The teacher sees only the global views, the student sees all of them, so the student must predict from a small
patch what the teacher sees in a large one: "local-to-global" correspondence.

    aug = MultiCropAugmentation(local_crops_number=8)   # 224/96 for ImageNet; 64/32 for the embedded data
    crops = aug(pil_image)          # [global1, global2, local1, ..., local8], uint8 tensors (3, H, W)
    crops = aug.batch(images, generators)  # the same for a batch: [global1, ...], uint8 (B, 3, H, W) each
    x = normalize(batch_of_crops)    # on the device: float, ImageNet mean/std

Each view: random resized crop (bicubic) -> flip (p 0.5) -> colour jitter (p 0.8; brightness 0.4, contrast 0.4,
saturation 0.2, hue 0.1, in a random order) -> grayscale (p 0.2) -> Gaussian blur -> solarize (official
`DataAugmentationDINO`). Choices that differ from the official code without changing the distribution of the views:
- the image becomes a uint8 tensor once; each crop is resized by torch's antialiased bicubic kernel (PIL's filter,
  several times faster), the colour operations run on the small float crop (exact HSV hue rotation instead of
  PIL's 8-bit HSV round trip) and the blur is PIL's three box passes written as tensor ops: 2-5x faster per
  image than the official PIL pipeline (`python benchmark.py`), the same views up to 8-bit rounding;
- all random draws of a view are made first (`plan_view`), then each operation runs once on all the crops of a
  batch that take it, with one factor per crop: for small crops the per-call cost of a tensor operation, not the
  arithmetic, is what takes the time (train.py augments a whole batch in the DataLoader's collate step);
- crops stay uint8 until they reach the device (4x less data from the loader workers; `normalize` there);
- every random draw comes from a `torch.Generator` passed in, so a sample's views are a pure function of
  (seed, epoch, index): a run resumed mid-epoch sees exactly the views of an uninterrupted one.
"""
import math
from typing import NamedTuple

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


def float_to_uint8(x):
    """A float tensor of whole numbers in [0, 255] -> a contiguous uint8 tensor. numpy's cast: torch's float ->
    uint8 cast is ~6x slower on CPU (2026-12-03, torch 2.14.1), a tenth of the view's time at 224 px."""
    return torch.from_numpy(np.ascontiguousarray(x.numpy()).astype(np.uint8))


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


# ---- colour operations on float crops (..., 3, H, W) with values in [0, 255] (torchvision's definitions) ----
# `factor` is a number, or a (N, 1, 1, 1) tensor: one factor per crop of a batch of N crops.
def grayscale(x):
    return (LUMA @ x.flatten(-2)).unflatten(-1, x.shape[-2:]).unsqueeze(-3)  # (..., 1, H, W)


def adjust_brightness(x, factor):
    return x.mul_(factor).clamp_(0, 255)


def adjust_contrast(x, factor):  # blend with the mean grey level of the image
    mean = (x.mean((-2, -1)) @ LUMA)[..., None, None, None]  # (..., 1, 1, 1)
    return x.mul_(factor).add_(mean * (1 - factor)).clamp_(0, 255)


def adjust_saturation(x, factor):  # blend with the image's own grayscale
    gray = grayscale(x)  # before x changes in place
    return x.mul_(factor).add_(gray * (1 - factor)).clamp_(0, 255)


HUE_OFFSETS = torch.tensor([2.0, 5 / 3, 4 / 3]).view(3, 1, 1)  # R, G, B phases (+1 turn: keeps frac positive)


def is_equal(a, b):
    """(a == b) as 0./1. floats: torch.eq writing floats directly is ~9x faster on CPU than bool, then .float()."""
    return torch.eq(a, b, out=torch.empty_like(a))


def adjust_hue(x, factor):
    """Rotate the HSV hue by `factor` turns, keeping saturation and value (max and min of R, G, B) exactly.

    Written with arithmetic only (no per-pixel branches, which are slow on tensors): the one-hot of the largest
    channel picks the textbook hue formula, and HSV -> RGB is the trapezoid form
    channel = min + chroma · clamp(|6·frac(hue + phase) - 3| - 1, 0, 1)."""
    r, g, b = x.split(1, dim=-3)  # (..., 1, H, W) each
    maxc, minc = x.amax(-3, keepdim=True), x.amin(-3, keepdim=True)
    chroma = maxc - minc
    is_r = is_equal(r, maxc)
    is_g = is_equal(g, maxc).mul_(1 - is_r)
    is_b = 1 - is_r - is_g  # one-hot of the (first) largest channel
    # hue in turns: (g - b)/C if R is the largest, (2 + (b - r)/C) if G, (4 + (r - g)/C) if B; all / 6
    h6 = is_r * (g - b) + is_g * (b - r).add_(chroma, alpha=2) + is_b * (r - g).add_(chroma, alpha=4)
    h = h6.div_(chroma.clamp_min(1e-3).mul_(6))  # grey pixels (chroma 0) get hue 0 and stay grey
    t = (h + factor + HUE_OFFSETS).frac_().mul_(6).sub_(3).abs_().sub_(1).clamp_(0, 1)  # (..., 3, H, W)
    return torch.addcmul(minc, chroma, t)


def box_blur(x, l, a, dim):
    """One pass of PIL's box blur of radius l + a along `dim` (-1: width, -2: height) of (N, 3, H, W) crops:
    weight 1 on the 2l+1 centre taps, a on the two next ones, edges replicated, the sum divided by 2(l + a) + 1.
    l is an integer, a a number or one per crop, (N, 1, 1, 1)."""
    n = x.shape[dim]
    xp = F.pad(x, (l + 1, l + 1, 0, 0) if dim == -1 else (0, 0, l + 1, l + 1), mode="replicate")
    centre = xp.narrow(dim, 1, n)
    for j in range(2, 2 * l + 2):
        centre = centre + xp.narrow(dim, j, n)
    far = xp.narrow(dim, 0, n) + xp.narrow(dim, 2 * l + 2, n)
    return centre.add_(far.mul_(a)).div_(2 * (l + a) + 1)


def box_radius(sigma, passes=3):
    """PIL's ImageFilter.GaussianBlur(sigma) is `passes` box blurs along each axis (Gwosdek et al. 2011) of radius
    l + a (l an integer, 0 <= a < 1) whose variance adds up to sigma²: returns (l, a)."""
    sigma2 = sigma * sigma / passes
    L = math.sqrt(12.0 * sigma2 + 1.0)  # box length with the same variance
    l = math.floor((L - 1.0) / 2.0)
    return l, (2 * l + 1) * (l * (l + 1) - 3 * sigma2) / (6 * (sigma2 - (l + 1) * (l + 1)))


def gaussian_blur(x, l, a, passes=3):
    """PIL's GaussianBlur of (N, 3, H, W) crops: `passes` box blurs of radius l + a (box_radius) along each axis."""
    for dim in (-1, -2):
        for _ in range(passes):
            x = box_blur(x, l, a, dim)
    return x


def _factor(strength, u):
    """ColorJitter's factor for a strength: uniform on [max(0, 1 - strength), 1 + strength], u uniform on [0, 1)."""
    lo = max(0.0, 1 - strength)
    return lo + (1 + strength - lo) * u


# Crops go through the operations together up to this many pixels a channel: 256 crops of 32 px, 64 of 64 px,
# 28 of 96 px, 5 of 224 px. Then a small tensor operation's per-call cost is paid once for many crops (the cpu
# preset's views 2.5x faster than one image at a time); larger chunks fall out of the CPU cache (lab/notes/speed.md).
CHUNK_PIXELS = 1 << 18
JITTER = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # ColorJitter's four, in its order


class ViewPlan(NamedTuple):
    """The random draws of one view, made before any pixel is touched."""
    box: tuple  # (left, top, right, bottom) of the random resized crop
    flip: bool
    jitter: list  # [(index into JITTER, factor), ...] in the order they apply; [] when no colour jitter
    gray: bool
    blur: float  # Gaussian blur sigma in pixels, 0 for none
    solarize: bool


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

    def plan_view(self, width, height, scale, blur_p, solarize_p, g):
        """The random draws of one view: crop, flip, colour jitter, grayscale, blur, solarize."""
        box = random_resized_crop_box(width, height, scale, g)
        u = torch.rand(14, generator=g, dtype=torch.float64).tolist()  # every other draw of this view
        jitter = []
        if u[1] < 0.8:  # ColorJitter(0.4s, 0.4s, 0.2s, 0.1s): random strengths, random order
            s = self.color_jitter
            factors = [_factor(0.4 * s, u[2]), _factor(0.4 * s, u[3]), _factor(0.2 * s, u[4]),
                       min(0.1 * s, 0.5) * (2 * u[5] - 1)]
            jitter = [(i, factors[i]) for i in sorted(range(4), key=lambda i: u[6 + i])]  # a uniform permutation
        lo, hi = self.blur_radius
        return ViewPlan(box, u[0] < 0.5, jitter, u[10] < 0.2, lo + (hi - lo) * u[12] if u[11] < blur_p else 0.0,
                        u[13] < solarize_p)

    def plan(self, width, height, g):
        """The draws of every view of one image: global 1 (always blurred), global 2 (solarized with p 0.2), locals."""
        views = [self.plan_view(width, height, self.global_crops_scale, 1.0, 0.0, g),
                 self.plan_view(width, height, self.global_crops_scale, 0.1, 0.2, g)]
        for _ in range(self.local_crops_number):
            views.append(self.plan_view(width, height, self.local_crops_scale, 0.5, 0.0, g))
        return views

    def __call__(self, img, generator=None):
        """The views of one PIL image: [global1, global2, local1, ...], uint8 (3, H, W) each."""
        return [v[0] for v in self.batch([img], [generator])]

    def batch(self, images, generators):
        """The views of a batch of PIL images, image i drawn from generators[i] (None: torch's default): a list of
        2 + N uint8 tensors (B, 3, size, size), view by view, as a DataLoader collates __call__'s lists.

        Each image's draws come first (`plan`), then every operation runs once on all the crops of a size that
        take it, so the per-call cost of hundreds of small tensor operations is paid once per batch."""
        pixels = [torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)[None]
                  for img in images]  # (1, 3, H, W) channels-last: the layout of the fast uint8 resize
        plans = [self.plan(p.shape[-1], p.shape[-2], g if g is not None else torch.default_generator)
                 for p, g in zip(pixels, generators)]
        n_views = 2 + self.local_crops_number
        views = []
        for size, js in [(self.global_size, range(2)), (self.local_size, range(2, n_views))]:
            crops = [(pixels[i], plans[i][j]) for j in js for i in range(len(images))]  # view by view
            chunk = max(1, CHUNK_PIXELS // (size * size))  # crops small enough together to stay in the cache
            if crops:
                views += torch.cat([self.apply(crops[k:k + chunk], size)
                                    for k in range(0, len(crops), chunk)]).split(len(images))
        return views

    def apply(self, crops, size):
        """[(image, ViewPlan), ...] -> uint8 (N, 3, size, size): the planned operations, each on all crops taking it."""
        plans = [p for _, p in crops]
        # crop and resize in one resampling pass; antialiased bicubic as PIL's resize (uint8 in, uint8 out)
        xs = [F.interpolate(img[..., top:bottom, left:right], size=(size, size), mode="bicubic", antialias=True)[0]
              for img, (left, top, right, bottom) in ((img, p.box) for img, p in crops)]  # (3, size, size) each
        xs = list(torch.stack(xs).float())

        def on(which, op, *factors):  # the crops n with which(n) become op(those crops, their factors)
            idx = [n for n in range(len(plans)) if which(n)]
            if idx:
                f = [torch.tensor([v[n] for n in idx], dtype=torch.float32).view(-1, 1, 1, 1) for v in factors]
                out = op(torch.stack([xs[n] for n in idx]), *f)  # (len(idx), 3, size, size), a new tensor
                for j, n in enumerate(idx):
                    xs[n] = out[j]

        for step in range(4):  # the colour jitter: at each of its 4 steps, each operation on the crops due for it
            for k, op in enumerate(JITTER):
                due = [len(p.jitter) > step and p.jitter[step][0] == k for p in plans]
                factor = [p.jitter[step][1] if d else 0.0 for p, d in zip(plans, due)]
                on(lambda n: due[n], op, factor)
        on(lambda n: plans[n].gray, lambda c: grayscale(c).expand_as(c))
        radius = [box_radius(p.blur) if p.blur else (0, 0.0) for p in plans]
        for l in sorted({r[0] for r, p in zip(radius, plans) if p.blur}):  # one call per integer part of the radius
            on(lambda n: plans[n].blur and radius[n][0] == l, lambda c, a: gaussian_blur(c, l, a),
               [r[1] for r in radius])
        xs = list(torch.stack(xs).round_().clamp_(0, 255))
        on(lambda n: plans[n].solarize, lambda c: torch.minimum(c, 255 - c))  # ImageOps.solarize(128), whole numbers
        # every operation above is mirror-symmetric, so flipping last is the same as flipping first
        on(lambda n: plans[n].flip, lambda c: c.flip(-1))
        return float_to_uint8(torch.stack(xs))


class eval_transform:
    """Evaluation view: resize the short side to size·256/224 (bicubic), centre-crop `size`, uint8 tensor.

    A class rather than a closure so that DataLoader workers can pickle it under any start method."""

    def __init__(self, size, resize=None):
        self.size, self.resize = size, resize or int(round(size * 256 / 224))

    def __call__(self, img):
        img = TF.resize(img.convert("RGB"), self.resize, interpolation=TF.InterpolationMode.BICUBIC)
        return to_uint8_tensor(TF.center_crop(img, self.size))
