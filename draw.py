"""How the embedded images are drawn (data.py holds the datasets built from them and says what each variant
teaches). Ten shapes as polygons inside the unit circle (SHAPES; SHAPES2: ten others), drawn at 2x and averaged
2x2 (cheap antialiasing), with a bool foreground mask per image.

    img, mask = render_image(np.random.default_rng([seed, split, i]), label, "scatter")   # (64, 64, 3), (64, 64)
"""
import numpy as np
from PIL import Image, ImageDraw

MAX_TILT = np.deg2rad(25)  # how far an object may lean from upright
GENERATOR_VERSION = 5  # bump whenever the drawing code changes: it is part of the cache key of data.py


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


_t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
_heart = np.stack([16 * np.sin(_t) ** 3, 13 * np.cos(_t) - 5 * np.cos(2 * _t) - 2 * np.cos(3 * _t) - np.cos(4 * _t)],
                  1)  # (48, 2), the classic parametric heart
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
SHAPES2 = {  # the held-out variant, scatter2: ten other shapes
    "pentagon": [(_ngon(5), 255)],
    "diamond": [(_ngon(4, aspect=0.5), 255)],
    "ellipse": [(_ngon(48, aspect=0.5), 255)],
    "tee": [(_poly(-1, -1, 1, -1, 1, -.55, .22, -.55, .22, 1, -.22, 1, -.22, -.55, -1, -.55), 255)],
    "chevron": [(_poly(-1, -.5, 0, .3, 1, -.5, 1, .05, 0, .85, -1, .05), 255)],
    "trapezoid": [(_poly(-1, .5, 1, .5, .4, -.5, -.4, -.5), 255)],
    "semicircle": [(_poly(_ngon(48)[:25]), 255)],
    "bowtie": [(_poly(-1, -.75, 0, -.12, 1, -.75, 1, .75, 0, .12, -1, .75), 255)],
    "u_shape": [(_poly(-.8, -.9, -.4, -.9, -.4, .4, .4, .4, .4, -.9, .8, -.9, .8, .8, -.8, .8), 255)],
    "frame": [(_ngon(4, phase=np.pi / 4), 255), (_ngon(4, r=0.6, phase=np.pi / 4), 0)],
}
VARIANTS = {"scatter": (SHAPES, "scatter"), "scatter2": (SHAPES2, "scatter"), "silhouettes": (SHAPES, "plain"),
            "shapes": (SHAPES, "gradient")}  # name -> (the shapes, how an image is drawn); see the docstring
DEFAULT_DATA = "scatter"  # what train.py, data.py and the evaluations use when no --data is given (README section 6)


# --- drawing one image -----------------------------------------------------------------------------------------
def _smooth_noise(rng, cells, S, channels):
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
    bg = c0 + (c1 - c0) * t + 30 * _smooth_noise(rng, 4, size, 3)  # (size, size, 3)
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


def render_image(rng, label, variant=DEFAULT_DATA, size=64, plain=False):
    """Draw one image of class `label`: returns uint8 (size, size, 3) and its bool (size, size) mask.
    `plain=True` draws the same object in white on black, without clutter or noise (used by the tests)."""
    shapes, style = VARIANTS[variant]
    if style == "scatter":
        return _render_scatter(rng, shapes, label, size, plain)
    plain = plain or style == "plain"
    S = 2 * size  # draw at 2x and average 2x2 pixels: cheap antialiasing
    # radius as a fraction of the side: the object spans 35-75% of the image side (50-70% for the silhouettes)
    r = rng.uniform(*((0.25, 0.35) if style == "plain" else (0.175, 0.375))) * S
    cx, cy = rng.uniform(r, S - r, 2)  # anywhere it fits entirely
    # Objects stand roughly upright (±25°), as objects in photographs do: DINO's augmentations (crops, flips,
    # colour) teach no rotation invariance, and with any rotation both views of an image share an orientation
    # that several classes have in common, so neighbours would be found by orientation rather than by shape.
    a = rng.uniform(-MAX_TILT, MAX_TILT)
    alpha = Image.new("L", (S, S), 0)
    _draw_shape(ImageDraw.Draw(alpha), list(shapes.values())[label], r, (cx, cy), a)
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


def _draw_shape(draw, polygons, r, centre, angle):
    """Fill a shape's polygons (255 draws, 0 cuts a hole) scaled to radius r, turned by angle, at centre."""
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    for poly, fill in polygons:
        draw.polygon([tuple(p) for p in poly @ rot.T * r + centre], fill=fill)


def _render_scatter(rng, shapes, label, size=64, plain=False):
    """`--data scatter`: 4-8 small copies of the class shape (radius 7-13% of the side), each with its own position,
    size, tilt and light grey, never overlapping, on a dark grey that is the same for every image.

    Where a copy lies is noise, and so is how big it is: two images of a class share no pixel pattern, so raw pixels
    and an untrained network find few neighbours of the right class (README section 6). Nearly every crop DINO takes
    holds a copy or more, and nothing else is common to the crops of one image (no level is drawn per image), so
    matching two views is done by the shape, which is what DINO has to learn."""
    S = 2 * size  # draw at 2x and average 2x2 pixels: cheap antialiasing
    alpha = Image.new("L", (S, S), 0)
    grey = Image.new("L", (S, S), 0)  # the grey level of each copy
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
