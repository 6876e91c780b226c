"""Linear probe on frozen features (paper Sec. 3.2 "Evaluation protocols" and App. "Linear evaluation").

The backbone is frozen; only one linear layer is trained, with cross-entropy, on top of
- ViT-S/T: the [CLS] tokens of the last 4 blocks, concatenated (n_last_blocks=4, avgpool_patchtokens=0);
- ViT-B: the last [CLS] token and the average of the last block's patch tokens (n_last_blocks=1, avgpool=1);
- ResNet: the 2048-d average-pooled feature of the last stage (the network's output once `fc` is removed).
As the official code: weights ~ N(0, 0.01²), bias 0; SGD momentum 0.9, no weight decay, lr = lr·batch_total/256,
cosine to 0 over the epochs (stepped per epoch); RandomResizedCrop + flip for training, resize + centre crop
for validation. Paper (ImageNet, ViT-S/16, 800 epochs): 77.0% top-1 after 100 epochs.
`--finetune` trains the backbone too (Table 6 fine-tunes DINO weights; the official code has none): AdamW as DeiT,
weight decay 0.05, the backbone at a tenth of the layer's learning rate, on augmented images.

    python eval_linear.py OUT/checkpoint.pth                    # embedded data: cached features, seconds on a CPU
    python eval_linear.py OUT/checkpoint.pth --finetune --labels_per_class 10    # fine-tuned on 10 images a class
    python eval_linear.py --pretrained dino_vitb16 --data /path/imagenet     # released weights (hub cache)
    python eval_linear.py dino_vitbase16_pretrain.pth --arch vit_base --patch 16 --data /path/imagenet
    python eval_linear.py --pretrained dino_resnet50 --data /path/imagenet   # the paper's ResNet-50: 75.3%
    torchrun --nproc_per_node=8 eval_linear.py CKPT --data /path/imagenet

`--cache_features 1` (default on the embedded data) extracts the features of the un-augmented images once and
trains on them: far faster, usually a little less accurate than the official augmented protocol (the default
for an image folder). Saved: `linear.pth` and `linear_log.txt`; with --finetune `finetune.pth` ({"model", "args"}:
the other scripts read it as a backbone; with --random_init it is Fig. 4's supervised control) and `finetune_log.txt`.
"""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision.transforms.v2 as T
from torch.utils.data import DataLoader, DistributedSampler

import augment
import checkpoint
import data as data_lib
import distributed
import vit
from eval_knn import add_data_arg, eval_data, eval_datasets, extract_features, frozen_backbone, labels_per_class


def block_features(model, images, n_last_blocks=4, avgpool_patchtokens=False):
    """[CLS] of the last n blocks, concatenated, and optionally the average-pooled patch tokens of the last one."""
    blocks = model.get_intermediate_layers(images, n_last_blocks)  # n x (B, 1+N, D), normed
    out = torch.cat([x[:, 0] for x in blocks], dim=-1)  # (B, n*D)
    if avgpool_patchtokens:
        avg = blocks[-1][:, 1:].mean(dim=1)  # (B, D)
        if n_last_blocks == 1:  # the official order interleaves [cls_0, avg_0, cls_1, avg_1, ...]: released
            out = torch.stack((out, avg), dim=-1).flatten(1)  # linear weights fit. (B, D, 2) -> (B, 2D)
        else:
            out = torch.cat((out, avg), dim=-1)  # (B, (n+1)*D)
    return out


class LinearClassifier(nn.Module):
    """One linear layer on frozen features (state dict keys `linear.weight`, `linear.bias`, as the official)."""

    def __init__(self, dim, num_labels):
        super().__init__()
        self.num_labels = num_labels
        self.linear = nn.Linear(dim, num_labels)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        return self.linear(x.flatten(1))  # (B, num_labels)


class FineTuned(nn.Module):
    """--finetune: the backbone and the linear layer as one network, both trained: uint8 images -> logits."""

    def __init__(self, backbone, features, linear):
        super().__init__()
        self.backbone, self.linear, self.features = backbone, linear, features  # features(normalised images)

    def forward(self, images):
        return self.linear(self.features(augment.normalize(images)))  # (B, num_labels)


def finetune_optimizer(model, lr, backbone_lr_scale, weight_decay=0.05):
    """AdamW as DeiT fine-tunes (decay on weight matrices only), the backbone at `backbone_lr_scale` x the layer's lr;
    the layer's groups first (the lr that is logged)."""
    groups = []
    for part, part_lr in ((model.linear, lr), (model.backbone, lr * backbone_lr_scale)):
        for decay in (True, False):
            params = [p for p in part.parameters() if (p.ndim > 1) == decay]
            groups.append({"params": params, "lr": part_lr, "weight_decay": weight_decay if decay else 0.0})
    return torch.optim.AdamW(groups)


class CachedFeatures:
    """Mini-batches of precomputed (features, labels), like a DataLoader. Under torchrun every process takes its
    share of one permutation that all of them draw alike (padded so that all get the same number of batches)."""

    def __init__(self, features, labels, batch_size, shuffle=False, seed=0):
        self.features, self.labels, self.batch_size, self.shuffle = features, labels, batch_size, shuffle
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        n = len(self.labels)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(1_000_003 * self.seed + self.epoch))
            if dist.is_initialized():
                world = dist.get_world_size()
                order = torch.cat((order, order[:(-n) % world]))[dist.get_rank()::world]
        else:
            order = torch.arange(n)
        for i in range(0, len(order), self.batch_size):
            idx = order[i:i + self.batch_size].to(self.labels.device)
            yield self.features[idx], self.labels[idx]  # (b, dim), (b,)


def train_transform(size):
    """Official linear-probe augmentation: RandomResizedCrop (scale 0.08-1, bilinear) + flip -> uint8 tensor."""
    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.PILToTensor()])


@torch.no_grad()
def validate(linear, loader, embed, device):
    """Mean loss, top-1 and top-5 (%) over the loader; top-5 is None with fewer than 5 classes (as official)."""
    linear.eval()
    loss_sum, correct1, correct5, total = 0.0, 0, 0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = linear(embed(x))  # (b, C)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (b, 5)
        hit = top.eq(y.view(-1, 1))  # (b, 5)
        correct1 += hit[:, :1].sum().item()
        correct5 += hit.sum().item()
        total += y.shape[0]
    acc5 = 100.0 * correct5 / total if logits.shape[1] >= 5 else None
    return {"loss": loss_sum / total, "acc1": 100.0 * correct1 / total, "acc5": acc5}


def train_linear(linear, train_loader, val_loader, epochs, lr, device, embed=None, log=print, log_file=None,
                 optimizer=None):
    """Train the linear layer (SGD momentum 0.9, no weight decay, cosine from `lr` to 0 stepped per epoch).

    `embed` maps a batch from the loaders to features (frozen backbone), identity for cached features (and for
    --finetune, where `linear` is the FineTuned network and `optimizer` its AdamW).
    Validates after every epoch; returns (best top-1, last validation stats).
    """
    embed = embed or (lambda x: x)
    optimizer = optimizer or torch.optim.SGD(linear.parameters(), lr, momentum=0.9, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0)
    best_acc, stats, lines = 0.0, {}, []
    for epoch in range(epochs):
        sampler = getattr(train_loader, "sampler", train_loader)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)  # a new shuffle per epoch, the same on every process
        linear.train()
        loss_sum, steps = torch.zeros((), device=device), 0
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.no_grad():
                features = embed(x)  # (b, dim): the backbone stays frozen
            loss = nn.functional.cross_entropy(linear(features), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            steps += 1
        if dist.is_initialized():  # the mean over all processes' batches
            dist.all_reduce(loss_sum)
            loss_sum /= dist.get_world_size()
        lr_used = optimizer.param_groups[0]["lr"]
        scheduler.step()
        stats = validate(linear, val_loader, embed, device)
        best_acc = max(best_acc, stats["acc1"])
        top5 = f"  Top5 {stats['acc5']:.2f}" if stats["acc5"] is not None else ""
        log(f"epoch {epoch:3d}  lr {lr_used:.2e}  train loss {loss_sum.item() / max(steps, 1):.4f}  "
            f"val loss {stats['loss']:.4f}  Top1 {stats['acc1']:.2f}{top5}  (best Top1 {best_acc:.2f})")
        if log_file:  # the log so far, re-written whole (atomic): a full disk leaves the previous one
            lines.append(json.dumps({"epoch": epoch, "lr": lr_used, "train_loss": loss_sum.item() / max(steps, 1),
                                     **{f"test_{k}": v for k, v in stats.items()}}) + "\n")
            checkpoint.write_text(log_file, "".join(lines))
    return best_acc, stats


def get_args_parser():
    p = argparse.ArgumentParser("eval_linear.py", description="Linear probe on frozen DINO features (Sec. 3.2).")
    checkpoint.add_weights_args(p)
    add_data_arg(p)
    p.add_argument("--epochs", default=None, type=int, help="training epochs (default: 100, as official; 30 with "
                   "--finetune, minutes on a CPU)")
    p.add_argument("--finetune", action="store_true", help="train the backbone too (Table 6): AdamW, weight decay "
                   "0.05, the backbone at --backbone_lr_scale x the lr, always on augmented images")
    p.add_argument("--backbone_lr_scale", default=0.1, type=float, help="with --finetune: the backbone's learning "
                   "rate as a share of the layer's (default: %(default)s)")
    p.add_argument("--labels_per_class", default=None, type=int, metavar="N", help="few labels: the labelled train "
                   "set cut to N images a class (a fixed seeded choice, the same as eval_knn.py's); val untouched")
    p.add_argument("--lr", default=0.001, type=float, help="learning rate for a total batch of 256, scaled linearly "
                   "with the batch size; worth tuning per checkpoint, as the official code advises (default: "
                   "%(default)s)")
    p.add_argument("--batch_size", "--batch_size_per_gpu", dest="batch_size", default=128, type=int,
                   help="images per step, per process (default: %(default)s)")
    p.add_argument("--n_last_blocks", default=None, type=int, help="concatenate the [CLS] tokens of the n last "
                   "blocks; default: 1 for vit_base, 4 otherwise (the paper's choice); ViTs only")
    p.add_argument("--avgpool_patchtokens", default=None, type=int, choices=(0, 1), help="also concatenate the "
                   "average-pooled patch tokens of the last block; default: 1 for vit_base, 0 otherwise")
    p.add_argument("--cache_features", default=None, type=int, choices=(0, 1), help="1: extract the features of the "
                   "un-augmented images once and train on them (fast); 0: official RandomResizedCrop+flip every "
                   "epoch; default: 1 on the embedded data, 0 on an image folder")
    p.add_argument("--image_size", default=None, type=int, help="crop size; default: the checkpoint's global crop "
                   "size, else 224")
    p.add_argument("--num_workers", default=2, type=int,
                   help="data loading processes per process; the official code uses 10 (default: %(default)s)")
    p.add_argument("--output_dir", default=None, help="where linear.pth and linear_log.txt go; default: the "
                   "checkpoint's folder (the current folder with --pretrained)")
    p.add_argument("--seed", default=0, type=int,
                   help="seed of the layer's init and of the data order (default: %(default)s)")
    return p


def run(args):
    rank, world, device = distributed.init()
    log = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    model, saved = frozen_backbone(args, device)  # a checkpoint file or --pretrained NAME (--random_init: untrained)
    model.requires_grad_(args.finetune)  # frozen, unless fine-tuned
    epochs = args.epochs or (30 if args.finetune else 100)
    is_base, is_vit = saved["arch"] == "vit_base", saved["arch"] not in vit.RESNETS
    n = args.n_last_blocks or (1 if is_base else 4)
    avgpool = bool(is_base if args.avgpool_patchtokens is None else args.avgpool_patchtokens)
    if is_vit and not 1 <= n <= len(model.blocks):
        raise ValueError(f"--n_last_blocks {n}: the model has {len(model.blocks)} blocks")
    size = checkpoint.eval_image_size(args.image_size, saved)
    data = eval_data(args, saved)
    cache = bool(data in data_lib.VARIANTS if args.cache_features is None else args.cache_features)
    if args.finetune and args.cache_features:
        raise ValueError("--finetune trains the backbone: its features cannot be cached (leave out --cache_features)")
    cache = cache and not args.finetune
    train_dataset, val_dataset = eval_datasets(data, size, None if cache else train_transform(size))
    num_labels = len(train_dataset.classes)
    if args.labels_per_class is not None:
        train_dataset = labels_per_class(train_dataset, args.labels_per_class)
    dim = model.embed_dim * (n + int(avgpool)) if is_vit else model.embed_dim
    what = f"[CLS] of {n} blocks{' + avg patch' if avgpool else ''}" if is_vit else "pooled last stage"
    log(f"{saved['arch']} ({args.pretrained or args.checkpoint_key}) on '{data}': {len(train_dataset)} train / "
        f"{len(val_dataset)} val images at {size}px, {num_labels} classes; features: {what} = {dim}-d; "
        f"{'cached' if cache else 'augmented'}{'; fine-tuned' if args.finetune else ''}")

    def frozen(x):  # normalised images -> frozen features (b, dim); a ResNet's output is its pooled feature
        return block_features(model, x, n, avgpool) if is_vit else model(x)

    def embed(images):  # uint8 images, as the loaders give them
        return frozen(augment.normalize(images))

    if cache:
        train_f, train_y = extract_features(frozen, train_dataset, device, args.batch_size, args.num_workers)
        val_f, val_y = extract_features(frozen, val_dataset, device, args.batch_size, args.num_workers)
        train_loader = CachedFeatures(train_f, train_y, args.batch_size, shuffle=True, seed=args.seed)
        val_loader = CachedFeatures(val_f, val_y, args.batch_size)
        embed = None
    else:
        sampler = DistributedSampler(train_dataset, seed=args.seed) if world > 1 else None
        kw = dict(batch_size=args.batch_size, num_workers=args.num_workers, pin_memory=device.type == "cuda",
                  persistent_workers=args.num_workers > 0)
        train_loader = DataLoader(train_dataset, sampler=sampler, shuffle=sampler is None, drop_last=False, **kw)
        val_loader = DataLoader(val_dataset, **kw)  # every process validates on all of val (as official)

    linear = LinearClassifier(dim, num_labels).to(device)
    lr = args.lr * args.batch_size * world / 256.0  # linear scaling rule
    optimizer, name = None, "linear"
    if args.finetune:  # one network, backbone included, on the augmented images
        linear, embed, name = FineTuned(model, frozen, linear), None, "finetune"
        optimizer = finetune_optimizer(linear, lr, args.backbone_lr_scale)
    if world > 1:
        linear = nn.parallel.DistributedDataParallel(linear, device_ids=[device] if device.type == "cuda" else None)
    output_dir = args.output_dir or (os.path.dirname(os.path.abspath(args.checkpoint)) if args.checkpoint else
                                     ".")  # with --pretrained: the current folder
    os.makedirs(output_dir, exist_ok=True)
    log_file = os.path.join(output_dir, f"{name}_log.txt") if rank == 0 else None
    if log_file:
        checkpoint.write_text(log_file, "")  # one run per log
    best, last = train_linear(linear, train_loader, val_loader, epochs, lr, device, embed, log, log_file, optimizer)
    if rank == 0:
        state = getattr(linear, "module", linear).state_dict()
        if args.finetune:  # the whole network and the shape it was built from: other scripts read it as a backbone
            state = {"model": state, "args": {**saved, "random_init": bool(args.random_init)}}
        checkpoint.save(state, os.path.join(output_dir, f"{name}.pth"))
        top5 = f", Top5: {last['acc5']:.2f}" if last.get("acc5") is not None else ""
        what = "Fine-tuning" if args.finetune else "Linear probe"
        print(f"{what} result: Top1: {last.get('acc1', 0.0):.2f}{top5} (best Top1: {best:.2f}); "
              f"saved {os.path.join(output_dir, f'{name}.pth')}")
    distributed.cleanup()


def main(argv=None):
    return checkpoint.run_script(run, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
