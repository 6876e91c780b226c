"""Embedded datasets that only the lab uses, put into data.VARIANTS when this module is imported (the core never
imports the lab, so `python train.py --data shapes` does not know them; run the script through this file).

`scatter2`: data.py's `scatter` with ten other shapes (SHAPES2): its sibling, held out from tuning until 2026-11-24,
    one of the lab suite's folders since (lab/recipes.py).
`shapes`: one large shape of data.SHAPES (35-75% of the side across), of a random colour, on a cluttered colour
    gradient with pixel noise: the documented failure. Two views share the background colours, and DINO matches
    views by the cheapest thing they share (lab/notes/recipe.md). README's collapse study draws its folder from it.
`silhouettes`: the same ten shapes, one per image, large (50-70% of the side across), white on black, with no
    clutter or noise: an easy control on which DINO visibly learns in minutes and on which raw pixels already find
    the class (the preset was tuned on it until 2026-11-24: lab/notes/recipe.md).

    python lab/variants.py train.py --data silhouettes --output_dir runs/silhouettes   # any top-level script
    python lab/variants.py data.py --make_folder /tmp/small --variant shapes --n_train 640 --n_val 100 --seed 7
"""
import os
import runpy
import sys

import numpy as np
from PIL import Image, ImageDraw

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the repository's modules
import data  # noqa: E402

SHAPES2 = {  # `scatter2`: ten other shapes, drawn with data.py's polygon helpers
    "pentagon": [(data._ngon(5), 255)],
    "diamond": [(data._ngon(4, aspect=0.5), 255)],
    "ellipse": [(data._ngon(48, aspect=0.5), 255)],
    "tee": [(data._poly(-1, -1, 1, -1, 1, -.55, .22, -.55, .22, 1, -.22, 1, -.22, -.55, -1, -.55), 255)],
    "chevron": [(data._poly(-1, -.5, 0, .3, 1, -.5, 1, .05, 0, .85, -1, .05), 255)],
    "trapezoid": [(data._poly(-1, .5, 1, .5, .4, -.5, -.4, -.5), 255)],
    "semicircle": [(data._poly(data._ngon(48)[:25]), 255)],
    "bowtie": [(data._poly(-1, -.75, 0, -.12, 1, -.75, 1, .75, 0, .12, -1, .75), 255)],
    "u_shape": [(data._poly(-.8, -.9, -.4, -.9, -.4, .4, .4, .4, .4, -.9, .8, -.9, .8, .8, -.8, .8), 255)],
    "frame": [(data._ngon(4, phase=np.pi / 4), 255), (data._ngon(4, r=0.6, phase=np.pi / 4), 0)],
}


def smooth_noise(rng, cells, S, channels):
    """Value noise: a (cells+1)^2 grid of N(0,1) values, smoothly interpolated to (S, S, channels)."""
    g = rng.normal(size=(cells + 1, cells + 1, channels))
    u = np.linspace(0, cells, S, endpoint=False)
    i, f = u.astype(int), u % 1
    f = (f * f * (3 - 2 * f))[:, None, None]  # smoothstep: no visible grid lines
    rows = g[i] * (1 - f) + g[i + 1] * f  # (S, cells+1, C)
    return rows[:, i] * (1 - f[None, :, :, 0]) + rows[:, i + 1] * f[None, :, :, 0]  # (S, S, C)


def _far_colour(rng, fg, min_dist=100):
    """A random colour at least `min_dist` (RGB L2) from the object's, so the object stays salient."""
    for _ in range(50):
        c = rng.uniform(0, 255, 3)
        if np.linalg.norm(c - fg) >= min_dist:
            return c
    return 255 - fg


def _background(rng, fg, size):
    """`shapes`: a 2x-size RGB PIL background, a colour gradient with clutter. The clutter (lines, blobs) is never a
    class object: it makes "find the big object" a real task, so attention that finds it has learnt something."""
    yy, xx = np.mgrid[0:size, 0:size] / size  # smooth fields are computed at 1x and upsampled: 4x cheaper
    c0, c1 = _far_colour(rng, fg), _far_colour(rng, fg)
    a = rng.uniform(0, 2 * np.pi)  # linear colour gradient in a random direction + low-frequency colour noise
    t = np.clip((xx - .5) * np.cos(a) + (yy - .5) * np.sin(a) + .5, 0, 1)[..., None]
    bg = c0 + (c1 - c0) * t + 30 * smooth_noise(rng, 4, size, 3)  # (size, size, 3)
    S = 2 * size
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8)).resize((S, S), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(3, 9)):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        x0, y0, length, angle = *rng.uniform(0, S, 2), rng.uniform(S / 6, S / 2), rng.uniform(0, 2 * np.pi)
        x1, y1 = x0 + length * np.cos(angle), y0 + length * np.sin(angle)  # strokes of 1/6 to 1/2 of the side
        w, r = int(rng.integers(2, 6)), rng.uniform(S / 40, S / 13)  # stroke width, blob radius (1.5-5 px at 64)
        if rng.integers(3) < 2:
            draw.line([(x0, y0), (x1, y1)], fill=colour, width=w)
        else:
            draw.ellipse([x0 - r, y0 - r, x0 + r * rng.uniform(.5, 1.5), y0 + r], fill=colour)
    return img


def render_object(rng, shapes, label, size=64, plain=False, radius=(0.175, 0.375)):
    """`shapes`: one large shape of class `label`, of a random colour, on a cluttered colour gradient (`_background`)
    with pixel noise; `radius`: its range as a share of the side (35-75% of the side across)."""
    S = 2 * size  # draw at 2x and average 2x2 pixels: cheap antialiasing
    r = rng.uniform(*radius) * S
    cx, cy = rng.uniform(r, S - r, 2)  # anywhere it fits entirely
    # Objects stand roughly upright (±25°), as objects in photographs do: DINO's augmentations (crops, flips,
    # colour) teach no rotation invariance, and with any rotation both views of an image share an orientation
    # that several classes have in common, so neighbours would be found by orientation rather than by shape.
    a = rng.uniform(-data.MAX_TILT, data.MAX_TILT)
    alpha = Image.new("L", (S, S), 0)
    data._draw_shape(ImageDraw.Draw(alpha), list(shapes.values())[label], r, (cx, cy), a)
    # The colour is drawn independently of the class, so no pixel statistic tells the class: only the shape does.
    fg = rng.uniform(0, 255, 3)
    if plain:
        img = alpha.convert("RGB")
    else:
        yy, xx = np.mgrid[0:S:2, 0:S:2] + 1.0  # 1x pixel centres, in 2x pixel units
        b = rng.uniform(0, 2 * np.pi)  # soft shading across the object, so it is not one flat colour
        shade = 35 * ((xx - cx) * np.cos(b) + (yy - cy) * np.sin(b)) / r  # (size, size)
        obj = Image.fromarray(np.clip(fg + shade[..., None], 0, 255).astype(np.uint8)).resize((S, S), Image.BILINEAR)
        img = Image.composite(obj, _background(rng, fg, size), alpha)
    mask = np.asarray(alpha.reduce(2)) >= 128  # (size, size): at least half of the pixel is object
    img = np.asarray(img.reduce(2), np.float32)  # (size, size, 3)
    if not plain:
        img = img + rng.normal(0, 6, img.shape)  # sensor-like pixel noise
    return np.clip(np.round(img), 0, 255).astype(np.uint8), mask


def render_silhouette(rng, shapes, label, size=64, plain=False):
    """One large shape (radius 25-35% of the side), white on black: render_object without its background."""
    return render_object(rng, shapes, label, size, plain=True, radius=(0.25, 0.35))


VARIANTS = {"scatter2": (SHAPES2, data._render_scatter), "shapes": (data.SHAPES, render_object),
            "silhouettes": (data.SHAPES, render_silhouette)}
data.VARIANTS.update(VARIANTS)

if __name__ == "__main__":
    if len(sys.argv) < 2 or not sys.argv[1].endswith(".py"):
        sys.exit("usage: python lab/variants.py SCRIPT.py [its flags]   (a top-level script, e.g. train.py)")
    sys.argv = sys.argv[1:]  # the script sees its own name and flags
    if sys.argv[0] == "data.py":  # run as a script it would be a second data module, without these variants
        data.main(sys.argv[1:])
    else:
        runpy.run_path(os.path.join(REPO, sys.argv[0]), run_name="__main__")
