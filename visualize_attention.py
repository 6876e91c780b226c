"""Self-attention of the [CLS] token, and the masks it makes (paper Sec. 4.2.2 "Probing the self-attention map",
Fig. 1, 3 and 4).

In the last block, the [CLS] query attends to every patch; drawn as an image, one map per head, it outlines the
objects although no label or mask was ever used (Fig. 1, 3). Keeping the patches that hold 60% of a map's mass gives
a segmentation mask; the paper scores these masks against ground-truth masks with the Jaccard index (intersection
over union). PASCAL VOC12 val, ViT-S/16: random weights 22.0, supervised 27.3, DINO 45.9 (Fig. 4).

    python visualize_attention.py OUT/checkpoint.pth --image cat.jpg --output_dir attn/
    python visualize_attention.py --pretrained dino_vits8 --image photo.jpg --output_dir out/   # Fig. 1, released
    python visualize_attention.py --pretrained dino_vits8 --image photos/ --output_dir out/     # one sheet per image
    python visualize_attention.py dino_deitsmall8_pretrain.pth --arch vit_small --patch 8 --image cat.jpg
    python visualize_attention.py OUT/checkpoint.pth --jaccard [--random_init]  # embedded data: masks built in
    python visualize_attention.py CKPT --jaccard --data /path/ROOT --masks /path/MASKROOT [--max_images 500]

Pictures: img.png (the input as the model saw it), attn-head{i}.png (head i's map), attn-overlay.png (each head in
its own colour, Fig. 3), mask-head{i}.png (head i's 60%-mass mask, Fig. 4); a folder as --image: a sheet per image.
The image is resized as the official script does (bilinear; --image_size H W squashes, one value sets the short side),
then cropped (top-left) to a multiple of the patch: 480 480 by default for released weights and official files (the
paper's figures), the training crop size for ours. Maps reach the pixels by repeating each patch's value (nearest).

`--jaccard` prints one line `Jaccard X`, X in percent like the paper's table, with the authors' protocol
(facebookresearch/dino issue #54): for each ground-truth object, the Jaccard of the head whose mask fits it best,
averaged over the image's objects, then over images. An indexed (palette) mask PNG holds object ids, as PASCAL VOC's
SegmentationObject: 0 background, 1..n the objects, 255 the void band along their edges, whose pixels count neither
in the intersection nor in the union; any other mask is one foreground object (nonzero). The Jaccard of the union
of all heads' masks with all objects is reported on stderr for comparison.
"""
import argparse
import colorsys
import os
import sys

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from tqdm import tqdm

import augment
import checkpoint
import data as data_lib
import eval_knn  # the model to evaluate: a checkpoint, --pretrained NAME or --random_init, as k-NN builds it

RELEASED_IMAGE_SIZE = [480, 480]  # the official default: the paper's figures, "3601 tokens for ViT-S/8" (Sec. 4.2.2)
VOID = 255  # PASCAL VOC's label of the band along object edges, left out of the Jaccard
# viridis (the colour map of the official pictures) at 0, 1/4, 1/2, 3/4 and 1 of the range; linear in between
VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float32)


# ----------------------------------------------------------------------------- attention, masks, Jaccard
def prepare(img, size, patch_size, labels=None):
    """PIL image -> uint8 (3, h, w) as the official script: resized to `size` ([H, W]: exactly; [S]: the short side,
    the aspect ratio kept; bilinear), cropped (top-left) to a multiple of the patch. Ground-truth labels (uint8
    (H, W)) go through the same resize (nearest) and crop: returns (image, labels)."""
    img = TF.resize(img.convert("RGB"), list(size), interpolation=TF.InterpolationMode.BILINEAR)
    h, w = img.height - img.height % patch_size, img.width - img.width % patch_size
    if h == 0 or w == 0:
        raise ValueError(f"a {img.width}x{img.height} image is smaller than one {patch_size}-pixel patch")
    x = augment.to_uint8_tensor(img)[:, :h, :w]  # (3, h, w)
    if labels is not None:
        labels = np.asarray(Image.fromarray(np.asarray(labels, np.uint8)).resize(img.size, Image.NEAREST))[:h, :w]
    return x, labels


@torch.no_grad()
def cls_attention(model, x):
    """uint8 images (B, 3, h, w) -> last-layer attention of the [CLS] query to every patch, (B, heads, h/P, w/P).
    Each softmax row sums to 1 over [CLS] + patches, so a map sums to 1 minus the [CLS]-to-itself weight."""
    attn = model.get_last_selfattention(augment.normalize(x))  # (B, heads, 1+N, 1+N)
    B, heads, P = attn.shape[0], attn.shape[1], model.patch_size
    return attn[:, :, 0, 1:].reshape(B, heads, x.shape[-2] // P, x.shape[-1] // P)  # row 0: [CLS]; columns 1: patches


def mass_mask(attn, threshold=0.6):
    """Keep the patches that hold `threshold` of each map's attention mass (Fig. 4: 60%), official rule: sort the
    values in increasing order, cumulative sum / total, keep a patch when that sum exceeds 1 - threshold.
    So the kept set is the smallest set of top patches whose mass is at least `threshold` (ties: the later patch
    ranks higher). attn (..., h, w) -> bool (..., h, w)."""
    flat = attn.flatten(-2)  # (..., N)
    values, order = flat.sort(dim=-1, stable=True)  # increasing
    cum = values.cumsum(-1) / values.sum(-1, keepdim=True)  # (..., N): mass of the patch and all smaller ones
    keep = torch.zeros_like(cum, dtype=torch.bool).scatter_(-1, order, cum > 1 - threshold)  # back to patch order
    return keep.reshape(attn.shape)


def to_pixels(grid, patch_size):
    """(..., h/P, w/P) -> (..., h, w): each patch's value over its P x P pixels (nearest upsampling by P)."""
    return grid.repeat_interleave(patch_size, -2).repeat_interleave(patch_size, -1)


def jaccard(pred, gt):
    """|pred ∩ gt| / |pred ∪ gt| over the last two dims (1 when both are empty); bool masks, broadcast."""
    inter = (pred & gt).flatten(-2).sum(-1).float()
    union = (pred | gt).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def object_jaccard(masks, labels):
    """The authors' Jaccard of one image: for each object of `labels` (int (h, w): 0 background, VOID void, other
    values objects), the best head's Jaccard with it; the mean over the objects. masks: bool (heads, h, w)."""
    masks = masks & (labels != VOID)  # void pixels count neither in the intersection nor in the union
    objects = [o for o in labels.unique().tolist() if o not in (0, VOID)]
    return float(np.mean([jaccard(masks, labels == o).max().item() for o in objects]))


def object_labels(dataset, i):
    """uint8 (H, W) labels of image i: an indexed (palette) PNG's object ids, or 1 on a mask's foreground; None
    without a mask."""
    path = dataset.mask_path(i) if hasattr(dataset, "mask_path") else None
    if path is not None:
        with Image.open(path) as m:
            if m.mode == "P":
                return np.array(m)
    mask = dataset.mask(i)
    return None if mask is None else mask.astype(np.uint8)


@torch.no_grad()
def evaluate_jaccard(model, dataset, size, threshold=0.6, max_images=None):
    """Mean over images of the authors' Jaccard (object_jaccard) and of the union-of-heads Jaccard (percent).
    Images without a mask, or without an object, are skipped. Returns (best, union, n, skipped)."""
    device, P = next(model.parameters()).device, model.patch_size
    indices = range(len(dataset))
    if max_images and max_images < len(dataset):  # every class keeps its share
        indices = data_lib.class_balanced_indices(dataset.targets, max_images)
    best, union, skipped = [], [], 0
    for i in tqdm(indices, desc="jaccard", leave=False, file=sys.stderr):
        labels = object_labels(dataset, i)
        if labels is not None:
            x, labels = prepare(dataset.image(i), size, P, labels)
            labels = torch.from_numpy(labels.astype(np.int64)).to(device)  # (h, w)
        if labels is None or not ((labels > 0) & (labels != VOID)).any():
            skipped += 1
            continue
        masks = to_pixels(mass_mask(cls_attention(model, x[None].to(device))[0], threshold), P)  # (heads, h, w)
        best.append(object_jaccard(masks, labels))  # per object, the best head (issue #54)
        valid = labels != VOID
        union.append(jaccard(masks.any(0) & valid, (labels > 0) & valid).item())  # all heads, all objects
    if not best:
        raise data_lib.DataError(f"none of the {len(indices)} images has a ground-truth foreground mask "
                                 "(masks mirror the image paths: MASKROOT/<class>/<name>.png)")
    return 100 * float(np.mean(best)), 100 * float(np.mean(union)), len(best), skipped


# ----------------------------------------------------------------------------- pictures (numpy, no matplotlib)
def heatmap(a):
    """(h, w) float -> (h, w, 3) uint8 through viridis, from the map's min to its max (as plt.imsave)."""
    t = (a - a.min()) / max(float(a.max() - a.min()), 1e-12) * (len(VIRIDIS) - 1)  # (h, w) in [0, 4]
    i = np.minimum(t.astype(int), len(VIRIDIS) - 2)
    f = (t - i)[..., None]  # (h, w, 1)
    return np.round(VIRIDIS[i] * (1 - f) + VIRIDIS[i + 1] * f).astype(np.uint8)  # (h, w, 3)


def head_colours(n):
    return np.array([colorsys.hsv_to_rgb(i / n, 0.85, 1.0) for i in range(n)]) * 255  # (n, 3), evenly spaced hues


def overlay(image, attn, alpha=0.6, cut=0.2):
    """Fig. 3: each head tints the image in its own colour where its map (scaled to [0, 1]) exceeds `cut`, with
    weight alpha * sqrt(map). image (h, w, 3) uint8, attn (heads, h, w) float."""
    out = image.astype(np.float32)
    for a, colour in zip(attn, head_colours(len(attn))):
        a = (a - a.min()) / max(float(a.max() - a.min()), 1e-12)
        w = (alpha * np.sqrt(a) * (a > cut))[..., None]  # (h, w, 1)
        out = out * (1 - w) + colour * w
    return np.round(out).astype(np.uint8)


def mask_picture(image, mask, colour, alpha=0.5):
    """Fig. 4: the image tinted where the mask is on, its boundary drawn in full colour."""
    out = np.where(mask[..., None], image * (1 - alpha) + colour * alpha, image)  # (h, w, 3)
    m = np.pad(mask, 1)
    inner = m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]  # all 4 neighbours inside
    out[mask & ~inner] = colour
    return np.round(out).astype(np.uint8)


@torch.no_grad()
def attention_and_masks(model, img, size, threshold=0.6):
    """PIL image -> the image as the model sees it, uint8 (3, h, w); each head's [CLS] attention (heads, h, w) and
    its `threshold`-mass mask, bool (heads, h, w), upsampled to pixels."""
    x, _ = prepare(img, size, model.patch_size)  # (3, h, w) uint8
    attn = cls_attention(model, x[None].to(next(model.parameters()).device))[0]  # (heads, h/P, w/P)
    masks = to_pixels(mass_mask(attn, threshold), model.patch_size)  # (heads, h, w)
    return x, to_pixels(attn, model.patch_size), masks


def pictures_of(model, image_path, size, threshold=0.6):
    """{file name: (h, w, 3) uint8} for img.png, attn-overlay.png, attn-head{i}.png and mask-head{i}.png."""
    x, attn, masks = attention_and_masks(model, data_lib.load_rgb(image_path), size, threshold)
    masks, attn = masks.cpu().numpy(), attn.float().cpu().numpy()  # (heads, h, w)
    image = x.permute(1, 2, 0).numpy()  # (h, w, 3)
    pictures = {"img.png": image, "attn-overlay.png": overlay(image, attn)}
    for i, colour in enumerate(head_colours(len(attn))):
        pictures[f"attn-head{i}.png"] = heatmap(attn[i])
        pictures[f"mask-head{i}.png"] = mask_picture(image, masks[i], colour)
    return pictures


def sheet(pictures, gap=4):
    """One picture of all: the image and each head's map in the first row, the overlay and each head's mask in the
    second, on white."""
    heads = sum(name.startswith("attn-head") for name in pictures)
    rows = [["img.png"] + [f"attn-head{i}.png" for i in range(heads)],
            ["attn-overlay.png"] + [f"mask-head{i}.png" for i in range(heads)]]
    h, w, _ = pictures["img.png"].shape
    out = np.full((2 * h + gap, (heads + 1) * (w + gap) - gap, 3), 255, np.uint8)  # (2h+gap, (1+heads)(w+gap)-gap, 3)
    for r, row in enumerate(rows):
        for c, name in enumerate(row):
            out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = pictures[name]
    return out


def save_png(picture, path):
    """Whole or not at all: a full disk or a folder that cannot be written raises checkpoint.WriteError."""
    checkpoint.write_atomic(path, lambda f: Image.fromarray(picture).save(f, "PNG"))


def visualize(model, image_path, output_dir, size, threshold=0.6):
    """An image file: write img.png, attn-head{i}.png, attn-overlay.png and mask-head{i}.png into output_dir.
    A folder: write one sheet per image in it, output_dir/<image name>.png. Returns the names written."""
    if os.path.isdir(image_path):
        files = sorted(f for f in os.listdir(image_path) if data_lib.is_image(f))
        if not files:
            raise data_lib.DataError(f"no images in {image_path}")
        os.makedirs(output_dir, exist_ok=True)
        names = [os.path.splitext(f)[0] + ".png" for f in files]
        for f, name in zip(tqdm(files, desc="sheets", leave=False, file=sys.stderr), names):
            picture = sheet(pictures_of(model, os.path.join(image_path, f), size, threshold))
            save_png(picture, os.path.join(output_dir, name))
        return names
    if not os.path.isfile(image_path):
        raise FileNotFoundError(f"image not found: {image_path}")
    pictures = pictures_of(model, image_path, size, threshold)
    os.makedirs(output_dir, exist_ok=True)
    for name, picture in pictures.items():
        save_png(picture, os.path.join(output_dir, name))
    return list(pictures)


# ----------------------------------------------------------------------------- command line
def get_args_parser():
    p = argparse.ArgumentParser("visualize_attention.py", description="[CLS] self-attention maps, their 60%-mass "
                                "masks, and their Jaccard with ground-truth masks (Sec. 4.2.2, Fig. 3-4).")
    checkpoint.add_weights_args(p)
    p.add_argument("--image", default=None, help="picture to visualise (any size, any format PIL reads), or a folder "
                   "of pictures (one sheet each)")
    p.add_argument("--output_dir", default=".", help="where the PNGs go (default: %(default)s)")
    p.add_argument("--image_size", default=None, type=int, nargs="+", metavar="SIZE", help="H W, or one value for the "
                   "short side; default: 480 480 for released weights (official), the training crop size for ours")
    p.add_argument("--threshold", default=0.6, type=float, help="share of each map's attention mass a mask keeps (0.6)")
    p.add_argument("--jaccard", action="store_true", help="score the masks against ground-truth foreground masks "
                   "of the val images; prints `Jaccard X` (percent)")
    p.add_argument("--data", default=None, help=f"with --jaccard: an embedded dataset (masks built in: "
                   f"{', '.join(data_lib.VARIANTS)}) or a folder with val/ class folders; default: the data the "
                   f"checkpoint was trained on, else '{data_lib.DEFAULT_DATA}'")
    p.add_argument("--masks", default=None, help="with --jaccard on a folder: masks mirroring the val/ image paths "
                   "(MASKROOT/<class>/<name>.png or MASKROOT/val/...; nonzero = foreground); default: ROOT/masks")
    p.add_argument("--seed", default=0, type=int, help="seed of --random_init (default: %(default)s)")
    p.add_argument("--max_images", default=None, type=int, help="with --jaccard: this many evenly spaced val images")
    return p


def run(args):
    if not args.image and not args.jaccard:
        raise ValueError("nothing to do: give --image PATH, or --jaccard")
    if not 0 < args.threshold <= 1:
        raise ValueError(f"--threshold must be in (0, 1], got {args.threshold}")
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max_images must be at least 1, got {args.max_images}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, saved = eval_knn.frozen_backbone(args, device, "[CLS] attention maps", args.seed)  # a ViT, not a ResNet
    if args.image_size and (len(args.image_size) > 2 or min(args.image_size) < 1):
        raise ValueError(f"--image_size takes one or two positive sizes, got {' '.join(map(str, args.image_size))}")
    size = args.image_size or ([int(saved["global_size"])] if saved.get("global_size") else RELEASED_IMAGE_SIZE)
    if args.image:
        names = visualize(model, args.image, args.output_dir, size, args.threshold)
        print(f"wrote {len(names)} pictures ({', '.join(names[:4])}, ...) to {args.output_dir}")
    if args.jaccard:
        data = args.data or saved.get("data") or data_lib.DEFAULT_DATA  # else the data it was trained on
        masks = args.masks or (None if data in data_lib.VARIANTS else os.path.join(data, "masks"))
        dataset = data_lib.build_dataset(data, "val", masks_root=masks)  # first: a missing data folder is the news
        if masks is not None and not os.path.isdir(masks):
            raise data_lib.DataError(f"masks folder not found: {masks} (--jaccard on an image folder needs "
                                     "--masks MASKROOT)")
        best, union, n, skipped = evaluate_jaccard(model, dataset, size, args.threshold, args.max_images)
        print(f"{saved['arch']}/{model.patch_size}, {len(model.blocks)} blocks"
              f"{' (random init)' if args.random_init else ''} on '{data}': {n} val images at "
              f"{'x'.join(map(str, size))}px ({skipped} without an object skipped), {args.threshold:.0%} of the "
              f"mass; Jaccard best head per object {best:.2f}, union of heads {union:.2f}", file=sys.stderr)
        print(f"Jaccard {best:.2f}")


def main(argv=None):
    return checkpoint.run_script(run, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
