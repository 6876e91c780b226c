"""Weighted k-NN classification on frozen features (paper Sec. 3.2 "Evaluation protocols"; Wu et al. 2018).

Every image goes once through the frozen backbone (the teacher by default); its [CLS] output (a ResNet's pooled
feature) is L2-normalised.
A test image is compared with all training images by cosine similarity; its k nearest neighbours vote for their
class with weight exp(similarity / T), T = 0.07, and the class with the most votes wins. No training, no
hyper-parameter to tune but k: a cheap probe of how well the features cluster by class. Paper (ImageNet,
ViT-S/16, 800 epochs): 74.5% top-1 with k = 20.

    python eval_knn.py OUT/checkpoint.pth                       # data, arch, patch and image size from the checkpoint
    python eval_knn.py --pretrained dino_vits16 --data /path/imagenet    # released weights, fetched to the hub cache
    python eval_knn.py dino_deitsmall16_pretrain.pth --arch vit_small --patch 16 --data /path/imagenet
    python eval_knn.py --pretrained dino_resnet50 --data /path/imagenet  # the paper's ResNet-50: 67.5% (Table 2)
    torchrun --nproc_per_node=8 eval_knn.py CKPT --data /path/imagenet     # features extracted in parallel

Also used by train.py as an online monitor (Fig. 7-style curves of k-NN accuracy during training):
    sets = monitor_datasets("scatter", 64); top1 = monitor_top1(teacher.backbone, *sets, device=device)
and by every evaluation script for what they share: the model (`frozen_backbone`, --random_init included), the data
(`eval_data`, `eval_datasets`, `labels_per_class`: the few-labels protocol) and the features (`extract_features`).
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

import augment
import checkpoint
import data as data_lib
import distributed
import vit


# ----------------------------------------------------------------------------- the classifier
@torch.no_grad()
def knn_classifier(train_features, train_labels, test_features, test_labels, k, T, num_classes=None, chunk_size=100):
    """Weighted k-NN, the official semantics; features must be L2-normalised rows. Returns (top1, top5) in percent.

    Test images are processed `chunk_size` at a time so memory stays O(chunk_size · N_train), whatever their number.
    Top-5 counts the first min(5, k) predictions as the official code does (with fewer than 5 neighbours there are
    fewer than 5 classes with a vote), and never more than there are classes.
    """
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, train_features.shape[0])  # cannot retrieve more neighbours than there are training images
    n_top5 = min(5, k, num_classes)
    train_features_t = train_features.t()  # (D, N_train)
    num_test = test_labels.shape[0]
    top1 = top5 = 0
    for start in range(0, num_test, chunk_size):
        features = test_features[start:start + chunk_size]  # (b, D)
        targets = test_labels[start:start + chunk_size]  # (b,)
        # cosine similarity = dot product of unit vectors
        similarity = features @ train_features_t  # (b, N_train)
        distances, indices = similarity.topk(k, dim=1, largest=True, sorted=True)  # (b, k)
        neighbours = train_labels[indices]  # (b, k): the class of each neighbour
        # votes_c = sum over the k neighbours j of class c of exp(s_j / T)  (= one-hot(y_j) weighted and summed)
        weights = (distances / T).exp()  # (b, k)
        votes = torch.zeros(targets.shape[0], num_classes, device=weights.device, dtype=weights.dtype)
        votes.scatter_add_(1, neighbours, weights)  # (b, C)
        # stable sort: classes with equal votes (e.g. none) stay in class order, so results are reproducible
        predictions = votes.sort(dim=1, descending=True, stable=True).indices  # (b, C)
        correct = predictions.eq(targets.view(-1, 1))  # (b, C)
        top1 += correct[:, :1].sum().item()
        top5 += correct[:, :n_top5].sum().item()
    return top1 * 100.0 / num_test, top5 * 100.0 / num_test


# ----------------------------------------------------------------------------- features
class _WithIndex(Dataset):
    """(image, label, index): the index says where a sample's feature goes when processes share the work."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, label = self.dataset[i]
        return image, label, i


@torch.no_grad()
def extract_features(model, dataset, device, batch_size=128, num_workers=0, progress=True):
    """Run `model` (any callable: normalised float images (B, 3, H, W) -> (B, D)) on every image of `dataset`.

    The dataset yields (uint8 image (3, H, W), label). Returns (features (N, D) float32, labels (N,) long) on
    `device`, in dataset order. Under torchrun every process extracts a shard and all of them get every feature,
    so all processes must call this together. The caller puts the model in eval mode.
    """
    if len(dataset) == 0:
        raise ValueError("cannot extract features of an empty dataset")
    sharded = dist.is_available() and dist.is_initialized()
    sampler = DistributedSampler(dataset, shuffle=False) if sharded else None  # pads to a multiple of world
    loader = DataLoader(_WithIndex(dataset), batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        pin_memory=device.type == "cuda", drop_last=False)
    show = progress and (not sharded or dist.get_rank() == 0)
    features = labels = None
    for images, targets, index in tqdm(loader, desc="features", disable=not show, leave=False):
        images = augment.normalize(images.to(device, non_blocking=True))  # uint8 -> float, ImageNet mean/std
        feats = model(images).float()  # (b, D); fp32 storage even if the caller runs under autocast
        targets, index = targets.to(device), index.to(device)
        if sharded:
            feats, targets, index = (distributed.all_gather(t) for t in (feats, targets, index))  # (world*b, ...)
        if features is None:
            features = torch.zeros(len(dataset), feats.shape[-1], device=device)  # (N, D)
            labels = torch.zeros(len(dataset), dtype=torch.long, device=device)  # (N,)
        features.index_copy_(0, index, feats)  # padded duplicates write the same row twice: harmless
        labels.index_copy_(0, index, targets.long())
    return features, labels


def num_classes_of(dataset, labels):
    classes = getattr(getattr(dataset, "dataset", dataset), "classes", None)  # a Subset's classes are its dataset's
    return len(classes) if classes else int(labels.max()) + 1


def monitor_datasets(data, image_size, max_train=10000, max_val=2000):
    """Labelled (train, val) datasets with the evaluation transform, for the online monitor of train.py.

    Each split is capped (a class-balanced subset) to keep the monitor to seconds."""
    sets = []
    for split, cap in (("train", max_train), ("val", max_val)):
        ds = data_lib.build_dataset(data, split, augment.eval_transform(image_size))
        sets.append(ds if len(ds) <= cap else Subset(ds, data_lib.class_balanced_indices(ds.targets, cap)))
    return tuple(sets)


def labels_per_class(dataset, n, seed=0):
    """The few-labels protocol (--labels_per_class): `n` training images of every class of `dataset`, a fixed choice
    drawn with `seed` (the same images in eval_knn.py and eval_linear.py); the val set is never reduced. n < 1 or
    more than a class has: data.DataError."""
    targets = np.asarray(dataset.targets)
    if n < 1:
        raise data_lib.DataError(f"--labels_per_class {n}: give at least 1 image a class")
    rng, chosen = np.random.default_rng(seed), []
    for label, name in enumerate(dataset.classes):
        own = np.flatnonzero(targets == label)  # this class's images
        if len(own) < n:
            raise data_lib.DataError(f"--labels_per_class {n}: class '{name}' has only {len(own)} training images")
        chosen += rng.choice(own, n, replace=False).tolist()
    return Subset(dataset, sorted(chosen))


@torch.no_grad()
def monitor_top1(model, train_dataset, val_dataset, device, k=20, temperature=0.07, batch_size=128, num_workers=0):
    """Online monitor for train.py: top-1 (%) of the weighted k-NN on `model`'s L2-normalised [CLS] features.

    The datasets already apply the evaluation transform (see `monitor_datasets`). The model's train/eval mode is
    restored. Under torchrun call it on every process (features are gathered); all of them get the same number.
    """
    was_training = model.training
    model.eval()
    try:
        train_features, train_labels = extract_features(model, train_dataset, device, batch_size, num_workers, False)
        test_features, test_labels = extract_features(model, val_dataset, device, batch_size, num_workers, False)
    finally:
        model.train(was_training)
    top1, _ = knn_classifier(F.normalize(train_features, dim=1), train_labels, F.normalize(test_features, dim=1),
                             test_labels, k, temperature, num_classes_of(train_dataset, train_labels))
    return top1


# ----------------------------------------------------------------------------- command line
def frozen_backbone(args, device, vit_needed=None, seed=0):
    """The network to evaluate, in eval mode on `device`, and its training args: a checkpoint file or --pretrained
    NAME (vit.from_args; `vit_needed`: what a ViT-only evaluation reads), or with `args.random_init` an untrained
    network of that shape (from `seed`). What every evaluation script evaluates."""
    model, saved = vit.from_args(args, vit_needed)
    if getattr(args, "random_init", False):  # same shape, fresh weights: what the features owe to training
        torch.manual_seed(seed)
        model = vit.build_like(saved)
    return model.to(device).eval(), saved


def weights_name(args):
    """What a script evaluates, for its first line: 'random init', the released name or the checkpoint's network."""
    return "random init" if args.random_init else args.pretrained or args.checkpoint_key


def add_data_arg(p):
    """--data of the evaluations on a labelled train/ and val/ split (k-NN, linear probe, retrieval)."""
    p.add_argument("--data", default=None, help=f"an embedded dataset ({', '.join(data_lib.VARIANTS)}) or a folder "
                   f"with train/ and val/ class folders; default: the data the checkpoint was trained on, else "
                   f"'{data_lib.DEFAULT_DATA}'")


def eval_data(args, saved):
    """--data, else the data the checkpoint was trained on (`saved`: its training args), else the embedded default."""
    return args.data or saved.get("data") or data_lib.DEFAULT_DATA


def eval_datasets(data, size, train_transform=None):
    """(train, val) of `data`: val with the evaluation transform at `size`, train too unless `train_transform`."""
    transform = augment.eval_transform(size)
    train = data_lib.build_dataset(data, "train", train_transform or transform)
    return train, data_lib.build_dataset(data, "val", transform)


def get_args_parser():
    p = argparse.ArgumentParser("eval_knn.py", description="Weighted k-NN on frozen DINO features (Sec. 3.2).")
    checkpoint.add_weights_args(p, also=" or --load_features")
    add_data_arg(p)
    p.add_argument("--nb_knn", default=[10, 20, 100, 200], nargs="+", type=int,
                   help="numbers of neighbours to try; 20 usually works best (default: %(default)s)")
    p.add_argument("--temperature", default=0.07, type=float,
                   help="temperature T of the vote weights exp(sim/T) (default: %(default)s)")
    p.add_argument("--image_size", default=None, type=int, help="centre-crop size (the image is first resized to "
                   "size*256/224); default: the checkpoint's global crop size, else 224")
    p.add_argument("--batch_size", "--batch_size_per_gpu", dest="batch_size", default=128, type=int,
                   help="images per forward pass, per process (default: %(default)s)")
    p.add_argument("--num_workers", default=2, type=int, help="data loading processes per process; raise it for "
                   "image folders on a big machine, the official code uses 10 (default: %(default)s)")
    p.add_argument("--raw_pixels", action="store_true", help="baseline: the flattened pixels of the evaluation view "
                   "as features (no network)")
    p.add_argument("--labels_per_class", default=None, type=int, metavar="N", help="few labels: the labelled train "
                   "set cut to N images a class (a fixed seeded choice, the same as eval_linear.py's); val untouched")
    p.add_argument("--dump_features", default=None, help="save the features and labels in this folder")
    p.add_argument("--load_features", default=None, help="folder of features saved by --dump_features: skip the model")
    return p


FEATURE_FILES = ("trainfeat.pth", "testfeat.pth", "trainlabels.pth", "testlabels.pth")  # the official names


def run(args):
    rank, _, device = distributed.init()
    num_classes = None
    if args.load_features:
        tensors = [checkpoint.load(os.path.join(args.load_features, f)).to(device) for f in FEATURE_FILES]
        train_features, test_features, train_labels, test_labels = tensors
    else:
        model, saved = frozen_backbone(args, device)
        if args.raw_pixels:  # (B, 3, H, W) normalised pixels -> (B, 3*H*W)
            model = torch.nn.Flatten()
        size = checkpoint.eval_image_size(args.image_size, saved)
        data = eval_data(args, saved)
        train_dataset, val_dataset = eval_datasets(data, size)
        if args.labels_per_class is not None:
            train_dataset = labels_per_class(train_dataset, args.labels_per_class)
        if rank == 0:
            what = "raw pixels" if args.raw_pixels else weights_name(args)
            print(f"{vit.describe(saved)} ({what}) on '{data}': {len(train_dataset)} train / {len(val_dataset)} "
                  f"val images at {size}px")
        train_features, train_labels = extract_features(model, train_dataset, device, args.batch_size,
                                                        args.num_workers)
        test_features, test_labels = extract_features(model, val_dataset, device, args.batch_size, args.num_workers)
        num_classes = num_classes_of(train_dataset, train_labels)
    train_features = F.normalize(train_features, dim=1, p=2)  # (N_train, D) unit rows
    test_features = F.normalize(test_features, dim=1, p=2)  # (N_test, D)
    if rank == 0:
        if args.dump_features:
            os.makedirs(args.dump_features, exist_ok=True)
            for f, t in zip(FEATURE_FILES, (train_features, test_features, train_labels, test_labels)):
                checkpoint.save(t.cpu(), os.path.join(args.dump_features, f))
        for k in args.nb_knn:
            top1, top5 = knn_classifier(train_features, train_labels, test_features, test_labels, k,
                                        args.temperature, num_classes)
            print(f"{k}-NN classifier result: Top1: {top1}, Top5: {top5}")
    distributed.cleanup()


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if not args.checkpoint and not args.pretrained and not args.load_features:
        parser.error("a checkpoint is required (or --pretrained NAME, or --load_features DIR)")
    if args.load_features and args.labels_per_class is not None:
        parser.error("--labels_per_class chooses among the images: it cannot cut features loaded by --load_features")
    return checkpoint.run_script(run, args)


if __name__ == "__main__":
    sys.exit(main())
