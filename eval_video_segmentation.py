"""Video object segmentation by label propagation on frozen patch features (paper Sec. 4.2.2, Table 5).

The first frame's object masks are given; every later frame takes its labels from earlier frames through the
affinity of its patch features with theirs, with nothing trained (as the official eval_video_segmentation.py):
- context: the first frame with its given masks, and the `n_last_frames` (7) previous frames with the soft masks
  propagated to them;
- affinity of target patch i with context patch j: exp(cos(f_i, f_j) / 0.1), zero unless j lies within
  `size_mask_neighborhood` (12) patches of i in both directions; of all context patches, only each target patch's
  `topk` (5) largest affinities are kept, and normalised to sum to 1;
- the target's soft masks are the weighted sum of the context's; upsampled bilinearly to pixels, each object's map is
  stretched to [0, 1] and the largest wins.
Features are the last block's normed patch tokens ([CLS] dropped). Scores as DAVIS's davis2017-evaluation: per
object, region similarity J (IoU) and boundary F-measure F (boundary pixels matched within 0.8% of the image
diagonal), averaged over the frames but the first (given) and the last, then over objects; J&F-Mean is their mean.
Paper (DAVIS-2017 val, 480p, J&F-Mean): DINO ViT-S/16 61.8, ViT-B/16 62.3, ViT-S/8 69.9, ViT-B/8 71.4.

    python eval_video_segmentation.py OUT/checkpoint.pth                # the embedded synthetic videos, seconds
    python eval_video_segmentation.py OUT/checkpoint.pth --random_init  # the same network, untrained
    python eval_video_segmentation.py --pretrained dino_vits8 --data /path/DAVIS --output_dir davis_masks/

The embedded videos (data.synthetic_videos): 8 videos of 24 frames, 128 px, three shapes that move, turn and cross
while the exposure drifts within the range of DINO's colour jitter (data.render_video).
DAVIS-2017 layout: ROOT/ImageSets/2017/val.txt, ROOT/JPEGImages/480p/<video>/*.jpg and ROOT/Annotations/480p/<video>/
*.png (indexed PNGs: 0 background, k object k, 255 void, read as background as davis2017-evaluation does); frames
are resized as the official code does (short side --image_size, the long side then rounded down to a multiple of
64, cv2's linear resize: `linear_resize`), results scored at the annotations' size. Every frame is normalised with
the official script's mean and std (`VIDEO_STD`). Still different from it: frames are decoded by PIL, not cv2, and
cv2 rounds its linear resize in fixed point (a grey level apart on some pixels: side by side on a DAVIS-layout
folder, 99.999% of the mask pixels agree); void in a first frame is background here, one more object there.
--output_dir writes the masks as indexed PNGs, OUTPUT_DIR/<video>/<frame>.png, as DAVIS's evaluation reads them.
"""
import argparse
import math
import os
import sys
from collections import deque

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import checkpoint
import data as data_lib
import eval_knn  # the model to evaluate: a checkpoint, --pretrained NAME or --random_init, as k-NN builds it


# The official script normalises frames with std 0.228 for red, not ImageNet's 0.229 (its color_normalize); kept, so
# that the same weights and frames give the same masks.
VIDEO_MEAN, VIDEO_STD = (0.485, 0.456, 0.406), (0.228, 0.224, 0.225)


# ----------------------------------------------------------------------------- label propagation
def neighbourhood(h, w, size):
    """(h*w, h*w) bool: patch j lies within `size` patches of patch i in both directions (official
    restrict_neighborhood; symmetric)."""
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    i, j = i.flatten(), j.flatten()  # (h*w,): row and column of each patch, raster order
    return ((i[:, None] - i[None]).abs() <= size) & ((j[:, None] - j[None]).abs() <= size)  # (h*w, h*w)


def propagate(target, context, context_segs, topk=5, temperature=0.1, near=None):
    """The soft masks of a target frame from its context frames (official label_propagation).

    target (N, D) patch features; context (T, N, D) the context frames' features; context_segs (T, C, N) their soft
    masks; near (N, N) bool or None. Returns (C, N)."""
    target, context = F.normalize(target, dim=-1), F.normalize(context, dim=-1)
    # a_ji = exp(cos(f_j, f_i) / 0.1): context patch j (of any context frame), target patch i
    aff = torch.exp(context @ target.T / temperature)  # (T, N_src, N_tar)
    if near is not None:
        aff = aff * near  # sources outside the target patch's neighbourhood weigh 0
    aff = aff.flatten(0, 1)  # (T*N_src, N_tar)
    kth = aff.topk(topk, dim=0).values[-1]  # (N_tar,): the k-th largest affinity of each target patch
    aff = torch.where(aff < kth, torch.zeros_like(aff), aff)  # keep the top k (and ties, as the official)
    aff = aff / aff.sum(0, keepdim=True)  # a target patch's weights sum to 1
    segs = context_segs.permute(1, 0, 2).flatten(1)  # (C, T*N_src), in the order of aff's rows
    return segs @ aff  # (C, N_tar)


def stretch(maps):
    """Each map (C, H, W) with a positive maximum rescaled to [0, 1] by its min and max (official norm_mask; a
    constant map, which the official divides by 0, becomes 0)."""
    lo, hi = maps.amin((1, 2), keepdim=True), maps.amax((1, 2), keepdim=True)  # (C, 1, 1)
    scaled = (maps - lo) / (hi - lo).clamp(min=1e-12)
    return torch.where(hi > 0, torch.where(hi > lo, scaled, torch.zeros_like(maps)), maps)


@torch.no_grad()
def patch_features(model, frame):
    """Normalised (3, H, W) -> the last block's normed patch tokens (h*w, D), [CLS] dropped."""
    return model.get_intermediate_layers(frame[None], n=1)[0][0, 1:]


@torch.no_grad()
def segment_video(model, frames, first_seg, n_last_frames=7, topk=5, size_mask_neighborhood=12, temperature=0.1):
    """Label maps (H, W) of frames 1, 2, ... (a generator). frames: normalised (3, H, W) tensors, H and W multiples
    of the patch; first_seg: (C, H/P, W/P) one-hot masks of frame 0 at patch resolution (channel 0 background)."""
    P = model.patch_size
    frames = iter(frames)
    first = patch_features(model, next(frames))  # (N, D)
    C, h, w = first_seg.shape
    near = neighbourhood(h, w, size_mask_neighborhood).to(first.device) if size_mask_neighborhood > 0 else None
    previous = deque(maxlen=n_last_frames)  # (features, soft masks) of the last frames
    for frame in frames:
        feats = patch_features(model, frame)  # (N, D)
        context = torch.stack([first] + [f for f, _ in previous])  # (T, N, D): the first frame always
        segs = torch.stack([first_seg.flatten(1)] + [s for _, s in previous])  # (T, C, N)
        seg = propagate(feats, context, segs, topk, temperature, near)  # (C, N)
        previous.append((feats, seg))
        maps = F.interpolate(seg.reshape(1, C, h, w), scale_factor=P, mode="bilinear", align_corners=False)[0]
        yield stretch(maps).argmax(0)  # (H, W)


# ----------------------------------------------------------------------------- J and F (davis2017-evaluation)
def region_similarity(pred, gt):
    """J = |pred ∩ gt| / |pred ∪ gt| of two bool masks; 1 when both are empty."""
    union = np.logical_or(pred, gt).sum()
    return 1.0 if union == 0 else np.logical_and(pred, gt).sum() / union


def boundary_map(seg):
    """The 1-pixel boundary of a bool mask (seg2bmap): pixels that differ from their right, lower or lower-right
    neighbour (outside the image counts as background); on the last row only the right one counts, on the last
    column only the lower one, and the corner never."""
    e, s, se = (np.zeros_like(seg) for _ in range(3))
    e[:, :-1], s[:-1, :], se[:-1, :-1] = seg[:, 1:], seg[1:, :], seg[1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def dilate(b, r):
    """Binary dilation by a disk of radius r (the offsets with x² + y² <= r²)."""
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    disk = torch.from_numpy((x * x + y * y <= r * r).astype(np.float32))[None, None]  # (1, 1, 2r+1, 2r+1)
    return F.conv2d(torch.from_numpy(b.astype(np.float32))[None, None], disk, padding=r)[0, 0].numpy() > 0


def boundary_f(pred, gt, bound_th=0.008):
    """F: the harmonic mean of boundary precision and recall; a boundary pixel matches if one of the other mask lies
    within ceil(bound_th x image diagonal) pixels (bound_th >= 1: that many pixels)."""
    r = int(bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*gt.shape)))
    pb, gb = boundary_map(pred), boundary_map(gt)
    n_pred, n_gt = pb.sum(), gb.sum()
    if n_pred == 0 or n_gt == 0:  # no boundary on one side: 1 if none on either, else precision or recall is 0
        return float(n_pred == n_gt)
    precision = (pb & dilate(gb, r)).sum() / n_pred
    recall = (gb & dilate(pb, r)).sum() / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def score_video(preds, gts):
    """Per object k = 1..K of the first annotation: the mean J and mean F over frames 1..T-2 (DAVIS leaves out the
    given first frame and the last). preds, gts: (T, H, W) label maps. Returns two lists of K floats."""
    J, Fs = [], []
    for k in range(1, int(gts[0].max()) + 1):
        frames = range(1, len(gts) - 1)
        J.append(np.mean([region_similarity(preds[t] == k, gts[t] == k) for t in frames]))
        Fs.append(np.mean([boundary_f(preds[t] == k, gts[t] == k) for t in frames]))
    return J, Fs


# ----------------------------------------------------------------------------- videos
def frame_size(h, w, size):
    """The official resize: the short side to `size`, the long side in proportion, rounded down to a multiple of 64."""
    if h > w:
        return int(size * h / w // 64 * 64), size
    return size, int(size * w / h // 64 * 64)


def linear_resize(frame, h, w):
    """uint8 (H, W, 3) -> uint8 (3, h, w) as the official cv2.resize(frame, (w, h)) (INTER_LINEAR): each output pixel
    mixes the 2 x 2 source pixels around its centre (half-pixel centres, edges clamped), with no antialiasing when
    shrinking (unlike PIL's bilinear), rounded back to uint8."""
    x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float()  # (1, 3, H, W)
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=False)
    return x[0].round().clamp(0, 255).to(torch.uint8)  # (3, h, w)


def normalize_frame(x):
    """uint8 (3, h, w) -> float (3, h, w), the official color_normalize of x / 255."""
    mean = torch.tensor(VIDEO_MEAN, device=x.device).view(3, 1, 1)
    return (x.float() / 255.0 - mean) / torch.tensor(VIDEO_STD, device=x.device).view(3, 1, 1)


def davis_videos(root):
    """(name, frames (T, H, W, 3) uint8, annotations (T, H, W) uint8) for each video of ROOT/ImageSets/2017/val.txt."""
    listing = os.path.join(root, "ImageSets", "2017", "val.txt")
    if not os.path.isfile(listing):
        raise data_lib.DataError(f"not a DAVIS-2017 folder: {listing} not found")
    with open(listing) as f:
        names = [line.strip() for line in f if line.strip()]
    for name in names:
        folder = os.path.join(root, "JPEGImages", "480p", name)
        files = sorted(f for f in os.listdir(folder) if f.endswith(".jpg")) if os.path.isdir(folder) else []
        if len(files) < 3:
            raise data_lib.DataError(f"{folder}: expected at least 3 .jpg frames")
        frames = np.stack([np.asarray(data_lib.load_rgb(os.path.join(folder, f))) for f in files])
        annotations = []
        for f in files:
            path = os.path.join(root, "Annotations", "480p", name, f[:-len(".jpg")] + ".png")
            if not os.path.isfile(path):
                raise data_lib.DataError(f"annotation not found: {path}")
            with Image.open(path) as im:
                a = np.array(im)  # palette indices: 0 background, k object k, 255 void
            a[a == 255] = 0  # void read as background, as davis2017-evaluation does
            annotations.append(a)
        yield name, frames, np.stack(annotations)


def davis_palette():
    """The PASCAL VOC / DAVIS colour map: the bits of label k, three at a time, from the high bit of R, G, B down."""
    palette = np.zeros((256, 3), np.uint8)
    for k in range(256):
        c = k
        for shift in range(7, -1, -1):
            palette[k] |= np.array([c & 1, (c >> 1) & 1, (c >> 2) & 1], np.uint8) << shift
            c >>= 3
    return palette


def save_indexed(path, labels):
    im = Image.fromarray(labels.astype(np.uint8), "P")
    im.putpalette(davis_palette().flatten().tolist())
    im.save(path)


@torch.no_grad()
def evaluate(model, videos, size=None, n_last_frames=7, topk=5, size_mask_neighborhood=12, output_dir=None):
    """J and F per object of every video (lists), after label propagation; size: the frames' short side, the long
    one rounded down to a multiple of 64 (None: the frames as they are)."""
    device, P = next(model.parameters()).device, model.patch_size
    J, Fs = [], []
    for name, frames, gts in videos:
        H, W = gts.shape[1:]
        h, w = frame_size(H, W, size) if size else (H, W)
        if h % P or w % P or min(h, w) < P:
            raise ValueError(f"frames of {w}x{h} px do not split into {P}-pixel patches: pick another --image_size")
        x = (normalize_frame(linear_resize(f, h, w).to(device)) for f in frames)  # (3, h, w) each, one at a time
        first = Image.fromarray(gts[0]).resize((w // P, h // P), Image.NEAREST)  # as the official read_seg
        first = torch.from_numpy(np.asarray(first).astype(np.int64)).to(device)  # (h/P, w/P)
        first_seg = F.one_hot(first, int(first.max()) + 1).permute(2, 0, 1).float()  # (C, h/P, w/P)
        preds = [gts[0]]
        for seg in segment_video(model, x, first_seg, n_last_frames, topk, size_mask_neighborhood):
            preds.append(np.asarray(Image.fromarray(seg.cpu().numpy().astype(np.uint8)).resize((W, H), Image.NEAREST)))
        j, f = score_video(preds, gts)
        J, Fs = J + j, Fs + f
        print(f"{name}: {len(j)} objects, J {100 * np.mean(j):.1f}, F {100 * np.mean(f):.1f}", file=sys.stderr)
        if output_dir:
            os.makedirs(os.path.join(output_dir, name), exist_ok=True)
            for t, pred in enumerate(preds):
                save_indexed(os.path.join(output_dir, name, f"{t:05d}.png"), pred)
    return J, Fs


# ----------------------------------------------------------------------------- command line
def get_args_parser():
    p = argparse.ArgumentParser("eval_video_segmentation.py", description="Video object segmentation by label "
                                "propagation on frozen patch features (Sec. 4.2.2, Table 5): prints J&F-Mean.")
    checkpoint.add_weights_args(p)
    p.add_argument("--data", default="synthetic", help="'synthetic' (the embedded videos) or a DAVIS-2017 folder "
                   "(default: %(default)s)")
    p.add_argument("--image_size", default=None, type=int, help="short side of the frames the network sees, a "
                   "multiple of the patch; default: 480 on DAVIS (the paper), the frames' own size otherwise")
    p.add_argument("--n_last_frames", default=7, type=int, help="previous frames in the context, besides the first "
                   "(default: %(default)s)")
    p.add_argument("--size_mask_neighborhood", default=12, type=int, help="labels come only from patches this many "
                   "patches away or closer, in each direction; 0: from anywhere (default: %(default)s)")
    p.add_argument("--topk", default=5, type=int, help="context patches each patch takes its label from "
                   "(default: %(default)s)")
    p.add_argument("--output_dir", default=None, help="write the masks as indexed PNGs into this folder")
    return p


def run(args):
    if args.topk < 1 or args.n_last_frames < 0 or args.size_mask_neighborhood < 0:
        raise ValueError("--topk must be at least 1, --n_last_frames and --size_mask_neighborhood at least 0")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, saved = eval_knn.frozen_backbone(args, device, vit_needed="patch tokens")  # a ResNet: one error line
    synthetic = args.data == "synthetic"
    videos = data_lib.synthetic_videos() if synthetic else davis_videos(args.data)
    size = args.image_size or (None if synthetic else 480)
    print(f"{saved['arch']}/{model.patch_size}, {len(model.blocks)} blocks ({eval_knn.weights_name(args)}) on "
          f"'{args.data}'{f' at {size}px' if size else ''}: {args.n_last_frames} previous frames, top-{args.topk}, "
          f"neighbourhood {args.size_mask_neighborhood}")
    J, Fs = evaluate(model, videos, size, args.n_last_frames, args.topk, args.size_mask_neighborhood, args.output_dir)
    j, f = 100 * float(np.mean(J)), 100 * float(np.mean(Fs))
    print(f"J&F-Mean: {(j + f) / 2:.2f}\nJ-Mean: {j:.2f}\nF-Mean: {f:.2f}")


def main(argv=None):
    return checkpoint.run_script(run, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
