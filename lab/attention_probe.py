"""Where does the [CLS] attention go? The Jaccard of visualize_attention.py (60% of the mass, best head per object)
for reference maps and for every block of a checkpoint's teacher and student, on a dataset's val masks.

    python lab/attention_probe.py out/checkpoint.pth                  # the data it was trained on
    python lab/attention_probe.py --data scatter                      # the references alone: no checkpoint
    python lab/attention_probe.py out/checkpoint.pth --data scatter2 --max_images 500

References: `uniform` (every patch the same weight), `foreground` (each patch weighted by its share of foreground
pixels: about the best a patch grid can do), the untrained network of the same shape (seed 0). Blocks: the [CLS]
query's attention in block i (the last block is the paper's). Also printed: the val masks' foreground fraction,
and the share of the last block's [CLS] attention that its single largest patch takes (high-norm tokens, Darcet et
al. 2023, would show as a share near 1 on background patches).
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import augment
import data as data_lib
import variants  # noqa: F401  (the lab's datasets, e.g. scatter2: lab/variants.py)
import vit
import visualize_attention as va


@torch.no_grad()
def block_attentions(model, x):
    """uint8 (B, 3, h, w) -> [(B, heads, h/P, w/P)] the [CLS] query's attention to the patches in every block."""
    P, out = model.patch_size, []
    t = model.prepare_tokens(augment.normalize(x))
    for blk in model.blocks:
        a = blk.attn(blk.norm1(t), return_attention=True)  # (B, heads, 1+N, 1+N)
        out.append(a[:, :, 0, 1:].reshape(a.shape[0], a.shape[1], x.shape[-2] // P, x.shape[-1] // P))
        t = blk(t)
    return out


def score(maps, labels, P):
    """The authors' Jaccard of one image from its maps (heads, h/P, w/P)."""
    return va.object_jaccard(va.to_pixels(va.mass_mask(maps), P), labels)


def probe(models, dataset, size, P, max_images=None):
    """{name: mean Jaccard in percent} over the val images with a foreground, for the references and each model's
    blocks; plus the foreground fraction and the top patch's share of the last block's attention."""
    indices = range(len(dataset))
    if max_images and max_images < len(dataset):
        indices = data_lib.class_balanced_indices(dataset.targets, max_images)
    rows, fg, top = {}, [], {name: [] for name in models}
    for i in indices:
        labels = va.object_labels(dataset, i)
        x, labels = va.prepare(dataset.image(i), size, P, labels)
        labels = torch.from_numpy(labels.astype(np.int64))
        obj = (labels > 0) & (labels != va.VOID)
        if not obj.any():
            continue
        fg.append(obj.float().mean().item())
        cover = obj.float().reshape(x.shape[1] // P, P, x.shape[2] // P, P).mean((1, 3))  # (h/P, w/P)
        refs = {"uniform": torch.ones_like(cover)[None], "foreground": (cover + 1e-6)[None]}
        for name, maps in refs.items():
            rows.setdefault(name, []).append(score(maps, labels, P))
        for name, model in models.items():
            blocks = block_attentions(model, x[None])
            for b, maps in enumerate(blocks):
                rows.setdefault(f"{name} block {b + 1}", []).append(score(maps[0], labels, P))
            last = blocks[-1][0].flatten(1)  # (heads, N)
            top[name].append((last.max(1).values / last.sum(1)).mean().item())
    out = {k: 100 * float(np.mean(v)) for k, v in rows.items()}
    return out, 100 * float(np.mean(fg)), {k: 100 * float(np.mean(v)) for k, v in top.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?", default=None)
    p.add_argument("--data", default=None, help="embedded dataset or folder (default: the checkpoint's)")
    p.add_argument("--max_images", default=None, type=int)
    p.add_argument("--patch", default=8, type=int, help="patch size of the references without a checkpoint")
    p.add_argument("--size", default=64, type=int, help="image side without a checkpoint")
    args = p.parse_args(argv)
    models, P, size, data = {}, args.patch, [args.size], args.data
    if args.checkpoint:
        for key in ("teacher", "student"):
            model, saved = vit.from_checkpoint(args.checkpoint, checkpoint_key=key)
            models[key] = model.eval()
        torch.manual_seed(0)  # the untrained network of visualize_attention.py --random_init
        models["untrained"] = vit.build_like(saved).eval()
        P, size = models["teacher"].patch_size, [int(saved.get("global_size") or args.size)]
        data = data or saved.get("data")
    data = data or data_lib.DEFAULT_DATA
    masks = None if data in data_lib.VARIANTS else os.path.join(data, "masks")
    rows, fg, top = probe(models, data_lib.build_dataset(data, "val", masks_root=masks), size, P, args.max_images)
    print(f"'{data}' val at {size[0]} px, patch {P}: foreground {fg:.1f}% of the pixels")
    for name, v in rows.items():
        print(f"  {name:22s} Jaccard {v:5.2f}")
    for name, v in top.items():
        print(f"  {name:22s} top patch's share of the last block's [CLS] attention {v:.1f}%")


if __name__ == "__main__":
    main()
