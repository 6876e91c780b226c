"""Image retrieval and copy detection with frozen features (paper Sec. 4.2.1, Tables 3 and 4).

Each image is described by its L2-normalised [CLS] feature (the teacher's, extracted as for k-NN; a ResNet's pooled
feature); a query ranks the database by cosine similarity, and mean average precision scores the rankings. AP is the
trapezoid rule of the Oxford / Holidays evaluation code that the official scripts use: the j-th relevant image
(j = 0, 1, ...) found at rank r adds ((j / r) + (j + 1) / (r + 1)) / 2 / n_relevant (j / r read as 1 at r = 0).

- default, retrieval: the checkpoint data's val images query its train images; those of the query's class are relevant.
- `--revisited ROOT --dataset roxford5k|rparis6k`: revisited Oxford / Paris, mAP for the Medium and Hard protocols
  as the official eval_image_retrieval.py (images shrunk to fit --imsize, whole; `--multiscale`). Paper, Table 3
  (Medium / Hard), ViT-S/16 on ImageNet: ROx 41.8 / 13.7, RPar 63.1 / 34.4; on Google Landmarks v2 (`--pretrained
  dino_vits16_gldv2`): ROx 51.5 / 24.3, RPar 75.3 / 51.6 (the official README: rparis6k at 512 with multiscale).
- `--mode copydetection`, a stand-in on the checkpoint's data: each val image is the original of one query, a
  strongly augmented copy of it (a DINO global view); the train images are distractors; [CLS] only, no whitening,
  the whole ranking scored. On `scatter` it is near chance.
- `--copydays ROOT`, the official eval_copy_detection.py protocol on Copydays: 320 x 320 images, [CLS] + GeM-pooled
  patch tokens (`cls_gem`), whitened on --whitening images, the originals + --distractors as database, AP over the
  top 20; the mAP of each block, then `mAP: X` of "strong". Paper, Table 4 (strong, 10k YFCC100M distractors,
  whitening learnt on 20k others): ViT-B/8 at 320 px 85.5 mAP.

    python eval_retrieval.py OUT/checkpoint.pth                        # val queries, train database: `mAP: X`
    python eval_retrieval.py OUT/checkpoint.pth --random_init          # the same network, untrained
    python eval_retrieval.py OUT/checkpoint.pth --mode copydetection
    python eval_retrieval.py --pretrained dino_vits16_gldv2 --revisited /path/revisitop --dataset rparis6k \
        --imsize 512 --multiscale
    python eval_retrieval.py --pretrained dino_vitb8 --copydays /path/copydays --distractors /path/yfcc10k \
        --whitening /path/yfcc20k
"""
import argparse
import os
import pickle
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

import augment
import checkpoint
import data as data_lib
import vit
from eval_knn import add_data_arg, eval_data, eval_datasets, extract_features, frozen_backbone, weights_name


# ----------------------------------------------------------------------------- mean average precision
@torch.no_grad()
def mean_average_precision(similarity, relevant, junk=None, top=None, chunk_size=256):
    """mAP (fraction) of the rankings of the database by `similarity` (Q, N), `relevant` (Q, N) bool the right
    answers; `junk` (Q, N) bool, optional: images left out of a query's ranking (revisited Oxford's junk); `top`:
    only the first `top` answers are looked at (a relevant image further down adds nothing, Copydays' top 20).
    Equal similarities keep database order. A query without any relevant image is left out of the mean."""
    aps = []
    for start in range(0, similarity.shape[0], chunk_size):
        order = similarity[start:start + chunk_size].argsort(dim=1, descending=True, stable=True)  # (q, N)
        hits = relevant[start:start + chunk_size].gather(1, order)  # (q, N): relevant or not, in ranked order
        kept = torch.ones_like(hits) if junk is None else ~junk[start:start + chunk_size].gather(1, order)
        hits = hits & kept
        n_relevant = hits.sum(1)  # (q,)
        if top is not None:
            hits[:, top:] = False
        rank = (kept.cumsum(1) - 1).clamp(min=0).double()  # (q, N): rank r once the junk is out (at relevant ones)
        j = (hits.cumsum(1) - 1).clamp(min=0).double()  # j: how many relevant images come before this one
        # (P_before + P_at) / 2 per relevant image: P_before = j / r (1 at r = 0), P_at = (j + 1) / (r + 1)
        before = torch.where(rank > 0, j / rank.clamp(min=1), torch.ones_like(j))
        trapezoid = (before + (j + 1) / (rank + 1)) / 2  # (q, N)
        ap = (trapezoid * hits).sum(1) / n_relevant.clamp(min=1)
        aps.append(ap[n_relevant > 0])
    aps = torch.cat(aps)
    if len(aps) == 0:
        raise ValueError("no query has a relevant image in the database")
    return aps.mean().item()


# ----------------------------------------------------------------------------- features
def multi_scale(model):
    """The official utils.multi_scale as a model: the mean of the features of the image at scales 1, 1/√2 and 1/2
    (bilinear, by `scale_factor`, no antialias). The official divides it by one norm for the batch; every row is
    L2-normalised afterwards anyway."""
    def features(x):  # (B, 3, H, W) normalised -> (B, D)
        return sum(model(x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False))
                   for s in (1, 1 / 2 ** 0.5, 1 / 2)) / 3
    return features


def cls_gem(model, p=4):
    """Copy detection's features (official eval_copy_detection.py): the [CLS] token of the last block beside the
    GeM pooling of its patch tokens, (mean_i max(x_i, 1e-6)^p)^(1/p) per channel."""
    def features(x):  # (B, 3, H, W) normalised -> (B, 2D)
        tokens = model.get_intermediate_layers(x, n=1)[0]  # (B, 1+N, D), after the final norm
        gem = tokens[:, 1:].clamp(min=1e-6).pow(p).mean(1).pow(1 / p)  # (B, D)
        return torch.cat((tokens[:, 0], gem), dim=1)  # (B, 2D)
    return features


def whitening(features, power=0.5):
    """(mean, W) learnt on `features` (n, D) as the official utils.PCA: eigen-decomposition of the uncentred second
    moment F^T F / n, eigenvalues below 1e-5 of the largest raised to it, W = diag(λ^-power) V^T (all D
    components, largest first). Apply as (x - mean) @ W.T."""
    f = features.double()
    values, vectors = torch.linalg.eigh(f.T @ f / len(f))  # increasing
    values = values.clamp(min=values.max().item() * 1e-5).flip(0)  # (D,), largest first
    return features.mean(0), (vectors.flip(1) / values ** power).T.float()  # (D,), (D, D)


# ----------------------------------------------------------------------------- queries and databases
class StrongCopies(Dataset):
    """A strongly augmented copy of each image of `dataset` (image i from the generator seeded by (seed, i)): a DINO
    global view (flip, crop 40-100%, colour jitter, grey, blur, solarize), uint8 (3, size, size), label i."""

    def __init__(self, dataset, size, seed=0):
        self.dataset, self.seed = dataset, seed
        self.augment = augment.MultiCropAugmentation(local_crops_number=0, global_size=size)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(1_000_003 * self.seed + i)
        return self.augment(self.dataset.image(i), g)[i % 2], i  # alternately global view 1 and 2


class ImageFiles(Dataset):
    """The images at `paths` as uint8 (3, H, W), label = index: shrunk to fit size x size (PIL thumbnail, Lanczos:
    the official retrieval's --imsize), or resized to size x size (bicubic: the official copy detection)."""

    def __init__(self, paths, size, resize="thumbnail"):
        self.paths, self.size, self.resize = paths, size, resize

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        img = data_lib.load_rgb(self.paths[i])
        if self.resize == "thumbnail":
            img.thumbnail((self.size, self.size), Image.LANCZOS)
        else:
            img = img.resize((self.size, self.size), Image.BICUBIC)
        return augment.to_uint8_tensor(img), i


def revisited(root, dataset, size):
    """(queries, database, gnd) of revisited Oxford / Paris: 'qimlist', 'imlist' and the ground truth."""
    path = os.path.join(root, dataset, f"gnd_{dataset}.pkl")
    if not os.path.isfile(path):
        raise data_lib.DataError(f"not a revisited Oxford / Paris folder: {path} not found")
    with open(path, "rb") as f:
        cfg = pickle.load(f)
    files = lambda names: [os.path.join(root, dataset, "jpg", n + ".jpg") for n in names]  # noqa: E731
    return ImageFiles(files(cfg["qimlist"]), size), ImageFiles(files(cfg["imlist"]), size), cfg["gnd"]


COPYDAYS_BLOCKS = ["original", "strong"] + [f"jpegqual/{q}" for q in (3, 5, 8, 10, 15, 20, 30, 50, 75)] + \
    [f"crops/{c}" for c in (10, 15, 20, 30, 40, 50, 60, 70, 80)]


def jpgs(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".jpg")) if os.path.isdir(folder) else []


def copydays_relevance(root, block, n_database):
    """(Q, n_database) bool: the originals (the first rows of the database) each query of `block` is a copy of."""
    originals, queries = jpgs(os.path.join(root, "original")), jpgs(os.path.join(root, block))
    relevant = torch.zeros(len(queries), n_database, dtype=torch.bool)
    for q, name in enumerate(queries):
        if block == "strong":  # several copies of one original: the names share their first 4 letters
            relevant[q, [i for i, o in enumerate(originals) if o[:4] == name[:4]]] = True
        else:
            relevant[q, q] = True
    return relevant


def revisited_relevance(gnd, n, protocol):
    """(relevant, junk) (Q, N) bool for the Medium (easy and hard relevant) or Hard protocol (hard relevant; easy
    images become junk), as the revisited Oxford / Paris evaluation."""
    relevant, junk = torch.zeros(len(gnd), n, dtype=torch.bool), torch.zeros(len(gnd), n, dtype=torch.bool)
    for q, g in enumerate(gnd):
        ok, bad = (("easy", "hard"), ("junk",)) if protocol == "medium" else (("hard",), ("junk", "easy"))
        relevant[q, np.concatenate([np.asarray(g[k], dtype=np.int64) for k in ok])] = True
        junk[q, np.concatenate([np.asarray(g[k], dtype=np.int64) for k in bad])] = True
    return relevant, junk


# ----------------------------------------------------------------------------- command line
def bool_flag(s):
    """`--multiscale`, or as the official command lines write it, `--multiscale 1` / `--multiscale 0`."""
    if str(s).lower() in ("1", "true", "on", "yes"):
        return True
    if str(s).lower() in ("0", "false", "off", "no"):
        return False
    raise ValueError(f"--multiscale: expected 0 or 1, got {s}")


def get_args_parser():
    p = argparse.ArgumentParser("eval_retrieval.py", description="Image retrieval and copy detection on frozen "
                                "features (Sec. 4.2.1): prints the mean average precision, `mAP: X`.")
    checkpoint.add_weights_args(p)
    p.add_argument("--mode", default="retrieval", choices=["retrieval", "copydetection"], help="retrieval: the "
                   "class of val queries in the train images; copydetection: their copies' originals (%(default)s)")
    add_data_arg(p)
    p.add_argument("--revisited", default=None, metavar="ROOT", help="instead of --data: the revisited Oxford / "
                   "Paris folder holding <dataset>/gnd_<dataset>.pkl and <dataset>/jpg/")
    p.add_argument("--dataset", default="roxford5k", choices=["roxford5k", "rparis6k"], help="with --revisited "
                   "(default: %(default)s)")
    p.add_argument("--copydays", default=None, metavar="ROOT", help="instead of --data: copy detection on a "
                   "Copydays folder (original/, strong/, jpegqual/*/, crops/*/), the official protocol")
    p.add_argument("--distractors", default=None, metavar="DIR", help="with --copydays: images added to the database")
    p.add_argument("--whitening", default=None, metavar="DIR", help="with --copydays: images to learn whitening on")
    p.add_argument("--image_size", "--imsize", dest="image_size", default=None, type=int, help="evaluation size "
                   "(default: the checkpoint's global crop size, else 224); with --revisited the square the image is "
                   "shrunk to fit (official: 224 Oxford, 512 Paris); with --copydays its side (default there: 320)")
    p.add_argument("--multiscale", nargs="?", const="1", default="0", metavar="0|1", help="average the features "
                   "of scales 1, 1/√2, 1/2 (official: rparis6k at --imsize 512); not with --copydays")
    p.add_argument("--seed", default=0, type=int, help="seed of the copies' augmentations (default: %(default)s)")
    p.add_argument("--batch_size", default=128, type=int, help="images per forward pass (default: %(default)s)")
    p.add_argument("--num_workers", default=2, type=int, help="data loading processes (default: %(default)s)")
    return p


def copy_detection(model, args, device, describe):
    """The official Copydays protocol: prints the mAP of every block there is, then `mAP: X` of "strong"."""
    size = args.image_size or 320
    blocks = [b for b in COPYDAYS_BLOCKS if jpgs(os.path.join(args.copydays, b))]
    if "original" not in blocks or "strong" not in blocks:
        raise data_lib.DataError(f"not a Copydays folder: no .jpg in {args.copydays}/original or /strong")
    folder_files = lambda d: [os.path.join(d, f) for f in sorted(os.listdir(d)) if data_lib.is_image(f)]  # noqa
    distractors = folder_files(args.distractors) if args.distractors else []
    originals = [os.path.join(args.copydays, "original", f) for f in jpgs(os.path.join(args.copydays, "original"))]
    print(f"{describe} on Copydays: blocks {', '.join(blocks)}; {len(originals)} originals + {len(distractors)} "
          f"distractors, {size}x{size}px, [CLS] + GeM, whitening {'on ' + args.whitening if args.whitening else 'off'}")

    def features(paths):  # (n, 2D)
        dataset = ImageFiles(paths, size, resize="square")
        return extract_features(cls_gem(model), dataset, device, args.batch_size, args.num_workers)[0].cpu()

    database = features(originals + distractors)
    queries = {b: features([os.path.join(args.copydays, b, f) for f in jpgs(os.path.join(args.copydays, b))])
               for b in blocks}
    if args.whitening:
        mean, W = whitening(features(folder_files(args.whitening)))
        database, queries = (database - mean) @ W.T, {b: (q - mean) @ W.T for b, q in queries.items()}
    database = F.normalize(database, dim=1)
    mAP = {}
    for b, q in queries.items():  # AP over the top 20 answers, as the official (Holidays) code
        relevant = copydays_relevance(args.copydays, b, len(database))
        mAP[b] = 100 * mean_average_precision(F.normalize(q, dim=1) @ database.T, relevant, top=20)
        print(f"mAP {b}: {mAP[b]:.2f}")
    print(f"mAP: {mAP['strong']:.2f}")  # the paper's Table 4 reports the strong copies


def run(args):
    args.multiscale = bool_flag(args.multiscale)
    if args.copydays and args.revisited:
        raise ValueError("give --revisited or --copydays, not both")
    if args.copydays and args.multiscale:
        raise ValueError("--multiscale is for retrieval; the official copy detection has none")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, saved = frozen_backbone(args, device)
    describe = f"{vit.describe(saved)} ({weights_name(args)}{', multiscale' if args.multiscale else ''})"
    if args.copydays:
        return copy_detection(model, args, device, describe)
    size = checkpoint.eval_image_size(args.image_size, saved)
    net = multi_scale(model) if args.multiscale else model

    def features(dataset, batch_size=args.batch_size):  # (n, D) unit rows
        return F.normalize(extract_features(net, dataset, device, batch_size, args.num_workers)[0], dim=1).cpu()

    if args.revisited:
        queries, database, gnd = revisited(args.revisited, args.dataset, size)
        print(f"{describe} on {args.dataset}: {len(queries)} queries, {len(database)} images, within "
              f"{size}x{size}px")
        similarity = features(queries, 1) @ features(database, 1).T  # (Q, N); batches of 1: sizes differ
        for protocol in ("medium", "hard"):
            relevant, junk = revisited_relevance(gnd, len(database), protocol)
            print(f"mAP {protocol.capitalize()}: {100 * mean_average_precision(similarity, relevant, junk):.2f}")
        return
    data = eval_data(args, saved)
    train, val = eval_datasets(data, size)
    if args.mode == "retrieval":
        queries, database = val, train
        print(f"{describe} on '{data}': {len(queries)} val queries, {len(database)} train images, same class "
              f"relevant, {size}px")
        relevant = torch.tensor(queries.targets)[:, None] == torch.tensor(database.targets)[None]  # (Q, N)
    else:
        queries = StrongCopies(data_lib.build_dataset(data, "val"), size, args.seed)  # copy i of val image i
        database = ConcatDataset([val, train])  # the originals first, then the distractors
        print(f"{describe} on '{data}': {len(queries)} strong copies of the val images, {len(val)} originals + "
              f"{len(train)} train distractors, {size}px")
        relevant = torch.eye(len(queries), len(database), dtype=torch.bool)  # query i is a copy of image i
    q, d = features(queries), features(database)
    print(f"mAP: {100 * mean_average_precision(q @ d.T, relevant):.2f}")


def main(argv=None):  # a missing file, not a checkpoint, a bad data folder or ground-truth file: one line
    return checkpoint.run_script(run, get_args_parser().parse_args(argv), (OSError, ValueError, KeyError))


if __name__ == "__main__":
    sys.exit(main())
