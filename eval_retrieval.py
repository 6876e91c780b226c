"""Image retrieval and copy detection with frozen [CLS] features (paper Sec. 4.2.1, Tables 3 and 4).

Each image is described by its L2-normalised [CLS] feature (the teacher's, extracted as for k-NN; a ResNet's pooled
feature); a query ranks the database by cosine similarity, and mean average precision scores the rankings. AP is the
trapezoid rule of the Oxford / Holidays evaluation code that the official scripts use: the j-th relevant image
(j = 0, 1, ...) found at rank r adds ((j / r) + (j + 1) / (r + 1)) / 2 / n_relevant (j / r read as 1 at r = 0).

- default, retrieval: the val images of the checkpoint's data are the queries, its train images the database, and
  an image is relevant when it has the query's class. Paper (revisited Oxford / Paris, ViT-S/16, ImageNet
  training, Medium): 31.5 / 58.8 mAP.
- `--mode copydetection`: each val image is the original of one query, a strongly augmented copy of it (a DINO
  global view: crop 40-100%, flip, colour jitter, grey, blur, solarize); the database holds the originals and the
  train images as distractors, and the original is the one relevant answer. Paper (Copydays "strong", with [CLS]
  and GeM-pooled patch tokens, whitening and 10k distractors): ViT-B/8 85.5 mAP. Here: [CLS] only, no whitening,
  the whole ranking scored (the official script scores the top 20).
- `--revisited ROOT --dataset roxford5k|rparis6k`: the revisited Oxford / Paris files (ROOT/<dataset>/gnd_<dataset>.pkl
  and jpg/), images shrunk to --image_size on their long side, mAP for the Medium and Hard protocols (untested here).

    python eval_retrieval.py OUT/checkpoint.pth                        # val queries, train database: `mAP: X`
    python eval_retrieval.py OUT/checkpoint.pth --random_init          # the same network, untrained
    python eval_retrieval.py OUT/checkpoint.pth --mode copydetection
    python eval_retrieval.py --pretrained dino_vits16 --revisited /path/revisitop --dataset roxford5k
"""
import argparse
import os
import pickle
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, Dataset

import augment
import checkpoint
import data as data_lib
import vit
from eval_knn import extract_features, frozen_backbone  # the features and the model, as k-NN takes them


# ----------------------------------------------------------------------------- mean average precision

@torch.no_grad()
def mean_average_precision(similarity, relevant, junk=None, chunk_size=256):
    """mAP (fraction) of the rankings of the database by `similarity` (Q, N), `relevant` (Q, N) bool the right
    answers; `junk` (Q, N) bool, optional: images left out of a query's ranking (revisited Oxford's junk). Equal
    similarities keep database order. A query without any relevant image is left out of the mean."""
    aps = []
    for start in range(0, similarity.shape[0], chunk_size):
        order = similarity[start:start + chunk_size].argsort(dim=1, descending=True, stable=True)  # (q, N)
        hits = relevant[start:start + chunk_size].gather(1, order)  # (q, N): relevant or not, in ranked order
        kept = torch.ones_like(hits) if junk is None else ~junk[start:start + chunk_size].gather(1, order)
        hits = hits & kept
        rank = (kept.cumsum(1) - 1).clamp(min=0).double()  # (q, N): rank r once the junk is out (at relevant ones)
        j = (hits.cumsum(1) - 1).clamp(min=0).double()  # j: how many relevant images come before this one
        # (P_before + P_at) / 2 per relevant image: P_before = j / r (1 at r = 0), P_at = (j + 1) / (r + 1)
        before = torch.where(rank > 0, j / rank.clamp(min=1), torch.ones_like(j))
        trapezoid = (before + (j + 1) / (rank + 1)) / 2  # (q, N)
        n_relevant = hits.sum(1)  # (q,)
        ap = (trapezoid * hits).sum(1) / n_relevant.clamp(min=1)
        aps.append(ap[n_relevant > 0])
    aps = torch.cat(aps)
    if len(aps) == 0:
        raise ValueError("no query has a relevant image in the database")
    return aps.mean().item()


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


class Revisited(Dataset):
    """revisited Oxford / Paris: the database ('imlist') or the queries ('qimlist'), long side shrunk to `size`."""

    def __init__(self, root, dataset, split, size):
        with open(os.path.join(root, dataset, f"gnd_{dataset}.pkl"), "rb") as f:
            self.cfg = pickle.load(f)
        self.folder, self.size = os.path.join(root, dataset, "jpg"), size
        self.names = self.cfg["qimlist" if split == "query" else "imlist"]

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        img = data_lib.load_rgb(os.path.join(self.folder, self.names[i] + ".jpg"))
        img.thumbnail((self.size, self.size))
        return augment.to_uint8_tensor(img), i


def class_relevance(query_labels, database_labels):
    return query_labels[:, None] == database_labels[None]  # (Q, N)


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

def get_args_parser():
    p = argparse.ArgumentParser("eval_retrieval.py", description="Image retrieval and copy detection on frozen "
                                "[CLS] features (Sec. 4.2.1): prints the mean average precision, `mAP: X`.")
    checkpoint.add_weights_args(p)
    p.add_argument("--random_init", action="store_true", help="baseline: an untrained network of the same shape")
    p.add_argument("--mode", default="retrieval", choices=["retrieval", "copydetection"], help="retrieval: val "
                   "queries, train database, same class relevant; copydetection: augmented copies of the val images "
                   "as queries, their originals the one relevant answer (default: %(default)s)")
    p.add_argument("--data", default=None, help=f"an embedded dataset ({', '.join(data_lib.VARIANTS)}) or a folder "
                   "with train/ and val/ class folders; default: the data the checkpoint was trained on, else "
                   f"'{data_lib.DEFAULT_DATA}'")
    p.add_argument("--revisited", default=None, metavar="ROOT", help="instead of --data: the revisited Oxford / "
                   "Paris folder holding <dataset>/gnd_<dataset>.pkl and <dataset>/jpg/")
    p.add_argument("--dataset", default="roxford5k", choices=["roxford5k", "rparis6k"], help="with --revisited "
                   "(default: %(default)s)")
    p.add_argument("--image_size", default=None, type=int, help="evaluation crop size; default: the checkpoint's "
                   "global crop size, else 224 (with --revisited: the long side)")
    p.add_argument("--seed", default=0, type=int, help="seed of the copies' augmentations (default: %(default)s)")
    p.add_argument("--batch_size", default=128, type=int, help="images per forward pass (default: %(default)s)")
    p.add_argument("--num_workers", default=2, type=int, help="data loading processes (default: %(default)s)")
    return p


def run(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, saved = frozen_backbone(args, device)
    size = checkpoint.eval_image_size(args.image_size, saved)
    what = "random init" if args.random_init else args.pretrained or args.checkpoint_key

    def features(dataset, batch_size=args.batch_size):  # (n, D) unit rows
        return F.normalize(extract_features(model, dataset, device, batch_size, args.num_workers)[0], dim=1).cpu()

    if args.revisited:
        queries = Revisited(args.revisited, args.dataset, "query", size)
        database = Revisited(args.revisited, args.dataset, "database", size)
        print(f"{vit.describe(saved)} ({what}) on {args.dataset}: {len(queries)} queries, "
              f"{len(database)} images, long side {size}px")
        similarity = features(queries, 1) @ features(database, 1).T  # (Q, N); batches of 1: sizes differ
        for protocol in ("medium", "hard"):
            relevant, junk = revisited_relevance(queries.cfg["gnd"], len(database), protocol)
            print(f"mAP {protocol.capitalize()}: {100 * mean_average_precision(similarity, relevant, junk):.2f}")
        return
    data = args.data or saved.get("data") or data_lib.DEFAULT_DATA  # else the data it was trained on
    transform = augment.eval_transform(size)
    train = data_lib.build_dataset(data, "train", transform)
    val = data_lib.build_dataset(data, "val", transform)
    if args.mode == "retrieval":
        queries, database = val, train
        print(f"{vit.describe(saved)} ({what}) on '{data}': {len(queries)} val queries, "
              f"{len(database)} train images, same class relevant, {size}px")
        q, d = features(queries), features(database)
        relevant = class_relevance(torch.tensor(queries.targets), torch.tensor(database.targets))
    else:
        queries = StrongCopies(data_lib.build_dataset(data, "val"), size, args.seed)  # copy i of val image i
        database = ConcatDataset([val, train])  # the originals first, then the distractors
        print(f"{vit.describe(saved)} ({what}) on '{data}': {len(queries)} strong copies of the val "
              f"images, {len(val)} originals + {len(train)} train distractors, {size}px")
        q, d = features(queries), features(database)
        relevant = torch.zeros(len(queries), len(database), dtype=torch.bool)
        relevant[torch.arange(len(queries)), torch.arange(len(queries))] = True  # query i is a copy of image i
    print(f"mAP: {100 * mean_average_precision(q @ d.T, relevant):.2f}")


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except (OSError, ValueError, KeyError) as e:  # missing file, not a checkpoint, bad data folder: one line
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
