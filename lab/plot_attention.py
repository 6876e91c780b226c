"""Fig. 4 at toy scale: the [CLS] attention of DINO beside the same ViT trained with labels, and untrained.

For a few val images of the embedded data: the image, then for each network its heads' attention (one colour a
head, as Fig. 3) and the 60%-mass mask of the head that fits the objects best (as Fig. 4), with that head's
Jaccard. The networks are what Fig. 4's three commands score (README §2):

    python lab/plot_attention.py out/checkpoint.pth out/supervised/finetune.pth --out docs/attention.png

Untrained: the seed-0 network of the checkpoint's shape (`visualize_attention.py --random_init`).
"""
import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data as data_lib
import variants  # noqa: F401  (the lab's datasets, e.g. scatter2: lab/variants.py)
import visualize_attention as va
import vit

SCALE, GAP = 2, 4  # each 64 px picture drawn at 128 px; white between pictures


def best_head(masks, labels):
    """(the head whose mask fits the foreground best, its Jaccard): masks bool (heads, h, w), labels (h, w)."""
    scores = va.jaccard(masks & (labels != va.VOID), (labels > 0) & (labels != va.VOID))  # void counts nowhere
    return int(scores.argmax()), float(scores.max())


def panel(model, img, labels, size):
    """[the attention overlay, the best head's mask] as (h, w, 3) uint8, and that head's Jaccard."""
    x, attn, masks = va.attention_and_masks(model, img, size)
    image = x.permute(1, 2, 0).numpy()
    h, score = best_head(masks, torch.from_numpy(labels.astype(np.int64)))
    colour = va.head_colours(len(attn))[h]
    return [va.overlay(image, attn.float().numpy()), va.mask_picture(image, masks[h].numpy(), colour)], score


def figure(models, dataset, indices, size):
    """One row per image: the image, then each network's overlay and best mask, its Jaccard written on the mask."""
    titles = ["image"] + [t for name in models for t in (name, f"{name}: mask")]
    rows = []
    for i in indices:
        img = dataset.image(i)
        x, labels = va.prepare(img, size, next(iter(models.values())).patch_size, dataset.mask(i).astype(np.uint8))
        row = [(x.permute(1, 2, 0).numpy(), None)]
        for model in models.values():
            (heads, mask), score = panel(model, img, labels, size)
            row += [(heads, None), (mask, f"J {100 * score:.0f}")]
        rows.append(row)
    h, w = rows[0][0][0].shape[0] * SCALE, rows[0][0][0].shape[1] * SCALE
    top = 14  # a line of text above the columns
    out = Image.new("RGB", (len(titles) * (w + GAP) - GAP, top + len(rows) * (h + GAP) - GAP), "white")
    draw = ImageDraw.Draw(out)
    for c, title in enumerate(titles):
        draw.text((c * (w + GAP) + 2, 1), title, fill="black")
    for r, row in enumerate(rows):
        for c, (picture, label) in enumerate(row):
            x0, y0 = c * (w + GAP), top + r * (h + GAP)
            out.paste(Image.fromarray(picture).resize((w, h), Image.NEAREST), (x0, y0))
            if label:
                draw.rectangle([x0, y0 + h - 13, x0 + 6 * len(label) + 3, y0 + h], fill="black")
                draw.text((x0 + 2, y0 + h - 12), label, fill="white")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dino", help="train.py's checkpoint (its teacher)")
    p.add_argument("supervised", help="eval_linear.py CKPT --finetune --random_init's finetune.pth")
    p.add_argument("--images", default=[0, 1, 2, 3, 4, 5], type=int, nargs="+", help="val image indices")
    p.add_argument("--out", default="docs/attention.png")
    args = p.parse_args(argv)
    dino, saved = vit.from_checkpoint(args.dino)
    supervised, _ = vit.from_checkpoint(args.supervised)
    torch.manual_seed(0)  # the untrained network of visualize_attention.py --random_init
    untrained = vit.build_like(saved)
    models = {"DINO": dino.eval(), "supervised": supervised.eval(), "untrained": untrained.eval()}
    data = saved.get("data") or data_lib.DEFAULT_DATA  # the data it was trained on: masks built in, or ROOT/masks
    dataset = data_lib.build_dataset(data, "val", masks_root=None if data in data_lib.VARIANTS else f"{data}/masks")
    picture = figure(models, dataset, args.images, [int(saved.get("global_size") or 64)])
    va.save_png(np.asarray(picture), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
