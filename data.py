"""The images DINO learns from: an embedded procedural dataset, real image folders, and the embedded videos.

- `ShapesDataset`: 64x64 RGB images of 10 shape classes, each with a foreground mask, drawn in seconds with numpy/PIL
  (no download ever) and cached under $DINO_CACHE or ~/.cache/dino_shapes. Labels serve evaluation only (k-NN,
  linear probe, Sec. 3.2); training never reads them. VARIANTS (the lab adds its own: lab/variants.py):
  `scatter` (the default): 4-8 small copies of the class shape on one dark grey. Two views of an image share nothing
      but the shape, so DINO must learn shapes; raw pixels and an untrained network do not (docs/cpu_recipe.md).
- `ImageFolderDataset`: ImageNet-style ROOT/{train,val}/<class>/<image> folders, read lazily; an unreadable file is
  skipped with a warning instead of crashing a run hours in. `build_dataset(data, split, ...)` picks one of the two.
- `synthetic_videos()`: the videos of eval_video_segmentation.py (Sec. 4.2.2): shapes that move, turn and cross.

Every dataset yields `(transform(img), label)` with `img` an RGB PIL image, and has `classes`, `targets`,
`image(i)` (the untransformed image) and `mask(i)` (bool (H, W) foreground, or None).

    python data.py --make_folder DIR [--seed 7]     # write the procedural images as an ImageNet-style folder
"""
import argparse
import os
import tempfile
import warnings

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

# ============ drawing the embedded images ============
MAX_TILT = np.deg2rad(25)  # how far an object may lean from upright
GENERATOR_VERSION = 5  # bump whenever the drawing code changes: it is part of the cache key (cache_path)


# --- the shapes, as polygons inside the unit circle; fill 255 draws the object, 0 cuts a hole -----------------
def _ngon(n, r=1.0, phase=0.0, dx=0.0, aspect=1.0):
    t = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([r * np.cos(t) + dx, aspect * r * np.sin(t)], 1)  # (n, 2)


def _poly(*xy):  # centre a polygon on its vertex mean and scale its farthest vertex to radius 1
    p = np.array(xy, dtype=np.float64).reshape(-1, 2)  # (n, 2)
    p -= p.mean(0)
    return p / np.linalg.norm(p, axis=1).max()


def _rect(hx, hy):  # a centred rectangle of half-sizes hx, hy
    return np.array([(-hx, -hy), (hx, -hy), (hx, hy), (-hx, hy)])


def _star(points, inner):
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return _ngon(2 * points) * r[:, None]


_t = np.linspace(0, 2 * np.pi, 48, endpoint=False)  # the classic parametric heart, (48, 2):
_heart = np.stack([16 * np.sin(_t) ** 3, 13 * np.cos(_t) - 5 * np.cos(2 * _t) - 2 * np.cos(3 * _t) - np.cos(4 * _t)], 1)
SHAPES = {
    "circle": [(_ngon(48), 255)],
    "square": [(_ngon(4, phase=np.pi / 4), 255)],
    "triangle": [(_ngon(3), 255)],
    "star": [(_star(5, 0.42), 255)],
    "cross": [(_rect(.96, .29), 255), (_rect(.29, .96), 255)],
    "ring": [(_ngon(48), 255), (_ngon(48, r=0.55), 0)],
    "heart": [(_poly(_heart), 255)],
    "crescent": [(_ngon(48), 255), (_ngon(48, r=0.8, dx=0.45), 0)],
    "arrow": [(_poly(-1, -.25, .1, -.25, .1, -.7, 1, 0, .1, .7, .1, .25, -1, .25), 255)],
    "L_shape": [(_poly(0, 0, .5, 0, .5, .75, .95, .75, .95, 1.25, 0, 1.25), 255)],
}
DEFAULT_DATA = "scatter"  # what train.py, data.py and the evaluations use when no --data is given


# --- drawing one image -----------------------------------------------------------------------------------------
def render_image(rng, label, variant=DEFAULT_DATA, size=64, plain=False):
    """Draw one image of class `label`: returns uint8 (size, size, 3) and its bool (size, size) mask.
    `plain=True` draws the same object(s) in white on black, without clutter or noise (used by the tests)."""
    shapes, draw = VARIANTS[variant]
    return draw(rng, shapes, label, size, plain)


def _draw_shape(draw, polygons, r, centre, angle):
    """Fill a shape's polygons (255 draws, 0 cuts a hole) scaled to radius r, turned by angle, at centre."""
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    for poly, fill in polygons:
        draw.polygon([tuple(p) for p in poly @ rot.T * r + centre], fill=fill)


def _render_scatter(rng, shapes, label, size=64, plain=False):
    """`--data scatter`: 4-8 copies of the class shape (radius 7-13% of the side), each with its own place, size, tilt
    and light grey, never overlapping, on one dark grey for every image. Where a copy lies and how big it is are noise,
    so two images of a class share no pixel pattern, and the crops of one image share nothing but the shape."""
    S = 2 * size  # draw at 2x and average 2x2 pixels: cheap antialiasing
    alpha, grey = Image.new("L", (S, S), 0), Image.new("L", (S, S), 0)  # where the copies are; the grey of each
    draw, paint = ImageDraw.Draw(alpha), ImageDraw.Draw(grey)
    placed, n = [], rng.integers(4, 9)  # (centre, radius) of the copies drawn so far, how many are wanted
    for _ in range(200):  # rejection sampling: a copy that would touch another one is not drawn
        if len(placed) == n:
            break
        r = rng.uniform(0.07, 0.13) * S
        c = rng.uniform(r, S - r, 2)
        if any(np.hypot(*(c - c2)) < r + r2 + 2 for c2, r2 in placed):
            continue
        placed.append((c, r))
        polygons, angle, level = list(shapes.values())[label], rng.uniform(-MAX_TILT, MAX_TILT), rng.uniform(170, 255)
        _draw_shape(draw, polygons, r, c, angle)
        _draw_shape(paint, [(p, int(level) if f else 0) for p, f in polygons], r, c, angle)
    cover = np.asarray(alpha.reduce(2), np.float32)[..., None] / 255  # (size, size, 1): how much copies cover
    mask = cover[..., 0] >= 0.5  # at least half of the pixel is object
    fg = 255.0 if plain else np.asarray(grey.reduce(2), np.float32)[..., None] / np.maximum(cover, 1e-6)
    bg = 0.0 if plain else 35.0  # one level for every image: a level drawn per image is shared by all its crops
    img = (bg + (fg - bg) * cover).repeat(3, 2)  # (size, size, 3)
    if not plain:
        img = img + rng.normal(0, 6, img.shape)  # sensor-like pixel noise
    return np.clip(np.round(img), 0, 255).astype(np.uint8), mask


VARIANTS = {"scatter": (SHAPES, _render_scatter)}  # name -> (its shapes, how an image is drawn); lab/variants.py adds


# ============ the embedded datasets ============
SPLITS = ("train", "val")
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MAX_CONSECUTIVE_FAILURES = 50


class DataError(ValueError):
    """A one-line, user-facing problem with the data (missing folder, no images, ...)."""


class UnreadableImageWarning(UserWarning):
    """An image file that could not be decoded and was skipped."""


def generate(n, seed=0, split="train", variant=DEFAULT_DATA, size=64):
    """n images (label = i % n_classes) -> uint8 (n,H,W,3), bool (n,H,W) masks, int64 labels. Image i has its own
    generator, seeded by (seed, split, i): it does not depend on n, and no val image is a copy of a training one."""
    n_classes = len(VARIANTS[variant][0])
    images, masks = np.empty((n, size, size, 3), np.uint8), np.empty((n, size, size), bool)
    labels = np.arange(n) % n_classes
    for i in range(n):
        rng = np.random.default_rng([seed, SPLITS.index(split), i])
        images[i], masks[i] = render_image(rng, labels[i], variant, size)
    return images, masks, labels


def cache_path(split, n, seed=0, variant=DEFAULT_DATA, size=64):
    root = os.environ.get("DINO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dino_shapes")
    return os.path.join(root, f"{variant}-v{GENERATOR_VERSION}-{split}-n{n}-seed{seed}-{size}px.npz")


def load_shapes(split, n, seed=0, variant=DEFAULT_DATA, size=64):
    """`generate`, cached in an .npz keyed by generator version and parameters."""
    path = cache_path(split, n, seed, variant, size)
    try:
        with np.load(path) as z:
            images, masks, labels = z["images"], z["masks"], z["labels"]
        if images.shape == (n, size, size, 3) and masks.shape == (n, size, size) and labels.shape == (n,):
            return images, masks, labels
    except Exception:  # missing, partial or corrupt: regenerate
        pass
    images, masks, labels = generate(n, seed, split, variant, size)
    tmp = None
    try:  # write a temporary file, then rename: a reader never sees half a cache, even with 8 ranks racing
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=images, masks=masks, labels=labels)
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"could not cache the shapes dataset at {path}: {e}")
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
    return images, masks, labels


class ShapesDataset(Dataset):
    """The embedded dataset; `n` defaults to 5000 train / 1000 val images (balanced classes)."""

    def __init__(self, split="train", n=None, seed=0, variant=DEFAULT_DATA, size=64, transform=None):
        if split not in SPLITS or variant not in VARIANTS:
            raise DataError(f"unknown split '{split}' or variant '{variant}' (known: {SPLITS}, {tuple(VARIANTS)})")
        n = n or {"train": 5000, "val": 1000}[split]
        self.images, self.masks, labels = load_shapes(split, n, seed, variant, size)
        self.classes, self.targets, self.transform = list(VARIANTS[variant][0]), labels.tolist(), transform

    def __len__(self):
        return len(self.images)

    def image(self, i):
        return Image.fromarray(self.images[i])

    def mask(self, i):
        return self.masks[i].copy()

    def __getitem__(self, i):
        img = self.image(i)
        return (self.transform(img) if self.transform else img), self.targets[i]


def class_balanced_indices(targets, n):
    """n sorted indices into `targets` that keep every class's share, whatever the order of the samples: grouped by
    label, then taken at even steps (even steps over the raw index of labels i % 10 could hit 5 classes only)."""
    by_class = np.argsort(np.asarray(targets), kind="stable")  # class 0's indices, then class 1's, ...
    return sorted(by_class[np.linspace(0, len(targets) - 1, n).round().astype(int)].tolist())


def make_folder_dataset(root, n_train, n_val, seed=0, size=64, variant=DEFAULT_DATA):
    """Write root/train/<class>/xxxxx.png, root/val/<class>/xxxxx.png and root/masks/val/<class>/xxxxx.png."""
    classes = list(VARIANTS[variant][0])
    for split, n in (("train", n_train), ("val", n_val)):
        images, masks, labels = generate(n, seed, split, variant, size)
        for i, (img, mask, label) in enumerate(zip(images, masks, labels)):
            name = os.path.join(classes[label], f"{i:05d}.png")
            files = [(os.path.join(root, split, name), img)]
            if split == "val":  # masks mirror the image paths under val/
                files.append((os.path.join(root, "masks", "val", name), mask.astype(np.uint8) * 255))
            for path, arr in files:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                Image.fromarray(arr).save(path)
    return root


# --- real image folders ----------------------------------------------------------------------------------------
def to_rgb(im):
    """Any PIL mode -> RGB: 16-bit scaled to 8-bit, transparency composited on white, CMYK/palette converted."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        a = np.asarray(im, dtype=np.float32)
        if im.mode.startswith("I;16") or a.max() > 255:
            a = a / 257  # 16-bit range -> 8-bit range
        im = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
    return im.convert("RGB")


def load_rgb(path):
    with Image.open(path) as im:
        im.load()  # decode now, inside the caller's try: a truncated file must fail here
        return to_rgb(im)


def is_image(name):
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


class ImageFolderDataset(Dataset):
    """root/<class>/**/<image>, classes sorted by name (like torchvision's ImageFolder). Files are only listed here,
    never opened (ImageNet has 1.28M of them); a file that fails to load is skipped later, in __getitem__."""

    def __init__(self, root, transform=None, masks_root=None):
        if not os.path.isdir(root):
            raise DataError(f"data folder not found: {root}")
        self.root, self.transform, self.masks_root = root, transform, masks_root
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        self.samples = []  # (path, label)
        for label, c in enumerate(self.classes):
            for dirpath, dirnames, files in os.walk(os.path.join(root, c), followlinks=True):
                dirnames.sort()
                self.samples += [(os.path.join(dirpath, f), label) for f in sorted(files) if is_image(f)]
        if not self.samples:
            loose = sum(is_image(f) for f in os.listdir(root))
            hint = f"{loose} images lie directly in it: move them to a class sub-folder" if loose else \
                "expected class sub-folders with .jpg/.png files"
            raise DataError(f"no images found in {root} ({hint})")
        self.targets = [label for _, label in self.samples]
        self.skipped = set()  # indices found unreadable (per process: each DataLoader worker has its own)

    def __len__(self):
        return len(self.samples)

    def image(self, i):
        return load_rgb(self.samples[i][0])

    def mask_path(self, i):
        """masks_root/<path of image i relative to root, any image extension>, or None if there is none."""
        if self.masks_root is None:
            return None
        stem = os.path.splitext(os.path.relpath(self.samples[i][0], self.root))[0]
        for ext in IMG_EXTENSIONS + tuple(e.upper() for e in IMG_EXTENSIONS):
            if os.path.exists(path := os.path.join(self.masks_root, stem + ext)):
                return path
        return None

    def mask(self, i):
        """The mask at mask_path(i), bool (H, W); nonzero = foreground."""
        if (path := self.mask_path(i)) is None:
            return None
        with Image.open(path) as m:
            a = np.asarray(m.convert("RGB") if m.mode in ("P", "CMYK") else m)
        if a.ndim == 3:  # RGB(A): any colour channel; LA: the L channel
            a = a[..., :3 if a.shape[-1] >= 3 else 1].max(-1)
        return a > 0

    def __getitem__(self, i):
        # A bad file must not kill a run hours in: warn, and return the next readable image (the same every epoch)
        for j in range(i, i + MAX_CONSECUTIVE_FAILURES + 1):
            j %= len(self.samples)
            if j in self.skipped:
                continue
            try:
                img = self.image(j)
            except Exception as e:
                self.skipped.add(j)
                warnings.warn(f"skipped {len(self.skipped)} unreadable images so far: {self.samples[j][0]}: {e}",
                              UnreadableImageWarning)
                continue
            return (self.transform(img) if self.transform else img), self.samples[j][1]
        raise DataError(f"over {MAX_CONSECUTIVE_FAILURES} consecutive unreadable images, from {self.samples[i][0]}")


def build_dataset(data, split, transform=None, masks_root=None):
    """`data` is an embedded dataset name (a key of VARIANTS) or a folder: for split 'train' ROOT/train if it
    exists, else ROOT itself; for 'val' ROOT/val (or ../val when ROOT is itself a train/ folder).
    `masks_root` mirrors the split folder (masks_root/<class>/<name>.png), or holds it (masks_root/<split>/...)."""
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}': use 'train' or 'val'")
    if data in VARIANTS:
        return ShapesDataset(split, variant=data, transform=transform)
    root = os.path.normpath(os.path.expanduser(str(data)))
    if not os.path.isdir(root):
        if not os.path.exists(root) and os.sep not in str(data) and not str(data).startswith((".", "~")):
            raise DataError(f"unknown data '{data}': use {' or '.join(VARIANTS)}, or the path of an image folder (the "
                            f"lab's datasets are known through lab/variants.py: python lab/variants.py train.py ...)")
        raise DataError(f"data folder not found: {root}")
    if split == "train":
        folder = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else root
    else:
        folder = os.path.join(root, "val")
        if not os.path.isdir(folder) and os.path.basename(root) == "train":  # --data /path/imagenet/train
            folder = os.path.join(os.path.dirname(root), "val")
        if not os.path.isdir(folder):
            raise DataError(f"no val/ folder in {root} (evaluation expects {root}{os.sep}val{os.sep}<class>/<image>)")
    if masks_root is not None and os.path.isdir(os.path.join(masks_root, split)):
        masks_root = os.path.join(masks_root, split)
    return ImageFolderDataset(folder, transform, masks_root)


# ============ the synthetic video (eval_video_segmentation.py) ============
VIDEO_SEEDS = 1000  # video i is drawn from the generator seeded by (VIDEO_SEEDS, i): apart from the images' seeds


def render_video(index, n_frames=24, size=128, n_objects=3, exposure=0.4):
    """Video `index`: `n_objects` shapes of different SHAPES classes, drawn as `scatter`'s copies but larger (radius
    10-14% of the side), turning and sliding on straight paths near the centre, so they cross and hide one another.
    Brightness and contrast follow slow waves within 1 ± exposure (DINO's colour jitter): grey levels alone cannot
    carry a label across frames (with exposure=0 they can, and an untrained network matches DINO).
    Returns uint8 frames (T, size, size, 3) and uint8 masks (T, size, size): 0 background, k for object k (1..n)."""
    rng = np.random.default_rng([VIDEO_SEEDS, index])
    S = 2 * size  # draw at 2x and average 2x2 pixels, as the images
    shapes = rng.choice(len(SHAPES), n_objects, replace=False)
    objects = []
    for k in range(n_objects):
        direction, offset = rng.uniform(0, 2 * np.pi), rng.uniform(-0.12, 0.12) * S  # the path and its distance
        along = np.array([np.cos(direction), np.sin(direction)])  # from the centre
        start, end = rng.uniform(-0.35, -0.1) * S, rng.uniform(0.1, 0.35) * S  # where on the path it starts, ends
        objects.append(dict(polygons=list(SHAPES.values())[shapes[k]], r=rng.uniform(0.1, 0.14) * S,
                            level=rng.uniform(170, 255), angle=rng.uniform(-np.pi, np.pi),
                            spin=rng.uniform(-1, 1) * np.deg2rad(10), along=along, start=start, end=end,
                            centre=S / 2 + offset * np.array([-along[1], along[0]])))
    t = np.arange(n_frames)
    phase = rng.uniform(0, 2 * np.pi, 2)
    brightness = 1 + exposure * np.sin(2 * np.pi * t / 9 + phase[0])  # (T,): periods of 9 and 7 frames
    contrast = 1 + exposure * np.sin(2 * np.pi * t / 7 + phase[1])
    frames, masks = np.empty((n_frames, size, size, 3), np.uint8), np.zeros((n_frames, size, size), np.uint8)
    for t in range(n_frames):
        img = np.full((size, size), 35.0)  # the dark grey of `scatter`
        u = t / max(n_frames - 1, 1)  # how far along its path each object is
        for k, o in enumerate(objects, start=1):  # back to front
            c = o["centre"] + ((1 - u) * o["start"] + u * o["end"]) * o["along"]  # (2,): position at frame t
            alpha = Image.new("L", (S, S), 0)
            _draw_shape(ImageDraw.Draw(alpha), o["polygons"], o["r"], c, o["angle"] + o["spin"] * t)
            cover = np.asarray(alpha.reduce(2), np.float32) / 255  # (size, size): how much of a pixel it covers
            img = img + (o["level"] - img) * cover  # drawn over what is behind it
            masks[t][cover >= 0.5] = k
        img = img * brightness[t]  # exposure, as torchvision's brightness and contrast: scale, blend with the mean
        img = img.mean() + (img - img.mean()) * contrast[t]
        img = img[..., None].repeat(3, 2) + rng.normal(0, 6, (size, size, 3))  # (size, size, 3), sensor-like noise
        frames[t] = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return frames, masks


def synthetic_videos(n_videos=8, n_frames=24, size=128):
    """[(name, frames, masks)] of `render_video`: eval_video_segmentation.py's default (a second or two to draw)."""
    return [(f"video{i:02d}", *render_video(i, n_frames, size)) for i in range(n_videos)]


def main(argv=None):
    p = argparse.ArgumentParser(description="Write the procedural dataset as an ImageNet-style image folder.")
    p.add_argument("--make_folder", required=True, metavar="DIR", help="write DIR/{train,val}/<class>/*.png and "
                   "the masks DIR/masks/val/<class>/*.png")
    p.add_argument("--variant", default=DEFAULT_DATA, choices=list(VARIANTS),
                   help="%(default)s (the lab's datasets: python lab/variants.py data.py ...)")
    p.add_argument("--n_train", type=int, default=5000, help="training images (default: %(default)s)")
    p.add_argument("--n_val", type=int, default=1000, help="validation images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="use a seed the recipe was not tuned on to hold data out")
    args = p.parse_args(argv)
    make_folder_dataset(args.make_folder, args.n_train, args.n_val, args.seed, variant=args.variant)
    print(f"wrote {args.n_train} train / {args.n_val} val images of '{args.variant}' to {args.make_folder}")


if __name__ == "__main__":
    main()
