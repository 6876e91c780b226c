"""The README's pictures of the data: a grid of samples with their masks, one example image, and the multi-crop
views of the CPU recipe (Sec. 3.1, multi-crop: 2 global + N local crops of each image).

    python plot_samples.py                                      # docs/samples.png, docs/multicrop.png, docs/example.png
    python plot_samples.py --data /tmp/held_out --out /tmp/pics/samples.png --n 16   # an image folder with val/
"""
import argparse
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules
import augment
import data as data_lib
import variants  # noqa: F401  (the lab's datasets, e.g. scatter2: lab/variants.py)
import train


def _outline(img, mask, colour=(255, 0, 0)):
    """Paint the mask's boundary pixels (in the mask, with a 4-neighbour outside it)."""
    m = np.pad(mask, 1)
    inner = m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    out = img.copy()
    out[mask & ~inner] = colour
    return out


def _sheet(rows, gap=4, fill=255):
    """Paste rows of HxWx3 uint8 tiles (any sizes) into one image, top-left aligned."""
    h = [max(t.shape[0] for t in row) for row in rows]
    w = max(sum(t.shape[1] + gap for t in row) for row in rows)
    sheet = np.full((sum(h) + gap * len(rows), w, 3), fill, np.uint8)
    y = 0
    for row, rh in zip(rows, h):
        x = 0
        for t in row:
            sheet[y:y + t.shape[0], x:x + t.shape[1]] = t
            x += t.shape[1] + gap
        y += rh + gap
    return Image.fromarray(sheet)


def save_samples(out, data=data_lib.DEFAULT_DATA, n=32, cols=4):
    masks = os.path.join(str(data), "masks")  # the layout make_folder_dataset writes
    ds = data_lib.build_dataset(data, "val", masks_root=masks if os.path.isdir(masks) else None)
    # shapes interleave the classes (label = i % 10); a folder is sorted by class, so spread the picks over it
    spread = np.unique(np.linspace(0, len(ds) - 1, n).astype(int))
    idx = range(min(n, len(ds))) if isinstance(ds, data_lib.ShapesDataset) else spread
    small = max(ds.image(0).size) <= 128  # the embedded data: draw the CPU recipe's crops and zoom 2x to see pixels
    up = (lambda a: a.repeat(2, 0).repeat(2, 1)) if small else (lambda a: a)  # noqa: E731
    tiles = []
    for i in idx:  # each tile: image | image with the mask outlined, class name underneath
        img = np.asarray(ds.image(i))
        m = ds.mask(i)
        pair = np.concatenate([img, _outline(img, m) if m is not None and m.shape == img.shape[:2] else img], 1)
        tile = Image.fromarray(np.pad(up(pair), ((0, 14), (0, 0), (0, 0)), constant_values=255))
        ImageDraw.Draw(tile).text((2, tile.height - 13), ds.classes[ds.targets[i]], fill=(0, 0, 0))
        tiles.append(np.asarray(tile))
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    _sheet([tiles[k:k + cols] for k in range(0, len(tiles), cols)]).save(out)
    example = os.path.join(os.path.dirname(out), "example.png")  # one val image, for visualize_attention.py
    ds.image(list(idx)[min(3, len(idx) - 1)]).save(example)
    print(f"wrote {out} and {example}")
    keys = ("global_crops_scale", "local_crops_scale", "local_crops_number", "global_size", "local_size", "blur_radius")
    aug = augment.MultiCropAugmentation(**{k: train.PRESETS["cpu" if small else "paper"][k] for k in keys})
    rows = []
    for i in list(idx)[:4]:  # original, then the 2 global and N local crops (Sec. 3.1, multi-crop)
        views = [np.asarray(v.permute(1, 2, 0).contiguous()) for v in aug(ds.image(i))]  # (H, W, 3) uint8
        rows.append([up(np.asarray(ds.image(i)))] + [up(v) for v in views])
    path = os.path.join(os.path.dirname(out), "multicrop.png")
    _sheet(rows).save(path)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Pictures of the data for the README: samples, masks, multi-crop views.")
    p.add_argument("--out", default="docs/samples.png", help="the sample grid (multicrop.png and example.png, one "
                   "val image, are written beside it)")
    p.add_argument("--data", default=data_lib.DEFAULT_DATA, help=f"one of {', '.join(data_lib.VARIANTS)} or an "
                   "image folder with val/ (default: %(default)s)")
    p.add_argument("--n", type=int, default=32, help="number of samples in the grid")
    args = p.parse_args(argv)
    try:
        save_samples(args.out, args.data, args.n)
    except data_lib.DataError as e:  # a user mistake: one line, no traceback
        p.error(str(e))


if __name__ == "__main__":
    main()
