"""Video segmentation (Sec. 4.2.2, Table 5): label propagation against a transcription of the official code, J and F
by hand, the synthetic video, the command line."""
import os
import queue
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import eval_video_segmentation as evs
import vit


# --- the official code, transcribed onto given features (facebookresearch/dino eval_video_segmentation.py) -----

def official_restrict_neighborhood(h, w, size):
    mask = torch.zeros(h, w, h, w)
    for i in range(h):
        for j in range(w):
            for p in range(2 * size + 1):
                for q in range(2 * size + 1):
                    if 0 <= i - size + p < h and 0 <= j - size + q < w:
                        mask[i, j, i - size + p, j - size + q] = 1
    return mask.reshape(h * w, h * w)


def official_label_propagation(feat_tar, list_frame_feats, list_segs, h, w, topk, size, mask_neighborhood=None):
    """feat_tar (h*w, dim); list_frame_feats: [(dim, h*w)]; list_segs: [(1, C, h, w)]."""
    return_feat_tar = feat_tar.T
    ncontext = len(list_frame_feats)
    feat_sources = F.normalize(torch.stack(list_frame_feats), dim=1, p=2)  # ncontext x dim x h*w
    feat_tar = F.normalize(feat_tar, dim=1, p=2).unsqueeze(0).repeat(ncontext, 1, 1)
    aff = torch.exp(torch.bmm(feat_tar, feat_sources) / 0.1)  # ncontext x h*w (queries) x h*w (keys)
    if size > 0:
        if mask_neighborhood is None:
            mask_neighborhood = official_restrict_neighborhood(h, w, size).unsqueeze(0).repeat(ncontext, 1, 1)
        aff *= mask_neighborhood
    aff = aff.transpose(2, 1).reshape(-1, h * w)  # ncontext*h*w (keys) x h*w (queries)
    tk_val, _ = torch.topk(aff, dim=0, k=topk)
    tk_val_min, _ = torch.min(tk_val, dim=0)
    aff[aff < tk_val_min] = 0
    aff = aff / torch.sum(aff, keepdim=True, axis=0)
    segs = torch.cat(list_segs)
    nmb_context, C, h, w = segs.shape
    segs = segs.reshape(nmb_context, C, -1).transpose(2, 1).reshape(-1, C).T  # C x nmb_context*h*w
    return torch.mm(segs, aff).reshape(1, C, h, w), return_feat_tar, mask_neighborhood


def official_norm_mask(mask):
    for c in range(mask.shape[0]):
        m = mask[c]
        if m.max() > 0:
            m = m - m.min()
            mask[c] = m / m.max()
    return mask


def official_video(features, first_seg, P, n_last_frames, topk, size):
    """The official eval_video_tracking_davis loop on precomputed features (T, h*w, dim): label maps of frames 1..."""
    h, w = first_seg.shape[-2:]
    que = queue.Queue(n_last_frames)
    frame1_feat = features[0].T
    mask_neighborhood, out = None, []
    for cnt in range(1, len(features)):
        used_feats = [frame1_feat] + [pair[0] for pair in list(que.queue)]
        used_segs = [first_seg] + [pair[1] for pair in list(que.queue)]
        avg, feat_tar, mask_neighborhood = official_label_propagation(features[cnt], used_feats, used_segs, h, w,
                                                                      topk, size, mask_neighborhood)
        if que.qsize() == n_last_frames:
            que.get()
        que.put([feat_tar, avg.clone()])
        avg = F.interpolate(avg, scale_factor=P, mode="bilinear", align_corners=False, recompute_scale_factor=False)[0]
        out.append(torch.max(official_norm_mask(avg), dim=0)[1])
    return out


def official_cv2_linear_resize(img, w, h):
    """cv2.resize(img, (w, h)), INTER_LINEAR, written out (in float; cv2's fixed-point weights may differ by one grey
    level): the source of output pixel d is (d + 0.5) * in / out - 0.5, clamped to the image, 2 taps, no antialias."""
    def taps(n_in, n_out):
        f = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        i = np.floor(f).astype(int)
        f = np.where(i < 0, 0.0, f - i)
        i = np.maximum(i, 0)
        return np.minimum(i, n_in - 1), np.minimum(i + 1, n_in - 1), f
    y0, y1, fy = taps(img.shape[0], h)
    x0, x1, fx = taps(img.shape[1], w)
    img = img.astype(np.float64)
    rows = img[y0] * (1 - fy)[:, None, None] + img[y1] * fy[:, None, None]
    out = rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def official_read_frame(img, scale_size=480):
    """read_frame on an RGB frame (cv2.imread gives BGR, which it reverses after the resize)."""
    ori_h, ori_w = img.shape[:2]
    if ori_h > ori_w:
        tw = scale_size
        th = int((tw * ori_h / ori_w) // 64 * 64)
    else:
        th = scale_size
        tw = int((th * ori_w / ori_h) // 64 * 64)
    img = official_cv2_linear_resize(img[:, :, ::-1], tw, th).astype(np.float32) / 255.0
    img = torch.from_numpy(np.transpose(img[:, :, ::-1].copy(), (2, 0, 1))).float()
    for t, m, s in zip(img, [0.485, 0.456, 0.406], [0.228, 0.224, 0.225]):  # color_normalize
        t.sub_(m)
        t.div_(s)
    return img


def official_read_seg(seg, factor, scale_size=480):
    """read_seg on an indexed annotation (PIL image): the one-hot (1, C, th/P, tw/P) of the nearest resize."""
    _w, _h = seg.size
    if _w > _h:
        _th = scale_size
        _tw = int((_th * _w / _h) // 64 * 64)
    else:
        _tw = scale_size
        _th = int((_tw * _h / _w) // 64 * 64)
    small = torch.from_numpy(np.array(seg.resize((_tw // factor, _th // factor), 0)).astype(np.int64))
    return F.one_hot(small, int(small.max()) + 1).permute(2, 0, 1)[None].float()


class PatchPixels(torch.nn.Module):
    """A stand-in backbone whose patch tokens are the pixels of each P x P patch: features known to the test."""
    patch_size = 2

    def get_intermediate_layers(self, x, n=1):
        tokens = F.unfold(x, self.patch_size, stride=self.patch_size).transpose(1, 2)  # (B, N, 3*P*P)
        return [torch.cat((torch.zeros_like(tokens[:, :1]), tokens), dim=1)]  # a [CLS] token in front


# --- label propagation -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("size,topk", [(0, 3), (1, 3), (2, 1)])
def test_propagation_matches_the_official_function(size, topk):
    g = torch.Generator().manual_seed(size)
    h, w, D, C, T = 3, 4, 5, 3, 3
    target, context = torch.randn(h * w, D, generator=g), torch.randn(T, h * w, D, generator=g)
    segs = torch.rand(T, C, h, w, generator=g)
    ours = evs.propagate(target, context, segs.flatten(2), topk, 0.1, evs.neighbourhood(h, w, size) if size else None)
    official, _, _ = official_label_propagation(target, list(context.transpose(1, 2)), list(segs[:, None]), h, w,
                                                topk, size)
    torch.testing.assert_close(ours.reshape(1, C, h, w), official)


def test_the_neighbourhood_is_the_official_one():
    assert torch.equal(evs.neighbourhood(3, 5, 1).float(), official_restrict_neighborhood(3, 5, 1))


def test_a_video_matches_the_official_loop_first_frame_always_in_context():
    g = torch.Generator().manual_seed(0)
    frames = torch.randn(7, 3, 8, 10, generator=g)  # 4 x 5 patches of 2 px
    first = torch.randint(0, 3, (4, 5), generator=g)
    first_seg = F.one_hot(first, 3).permute(2, 0, 1).float()  # (C, h, w)
    model = PatchPixels()
    feats = torch.stack([model.get_intermediate_layers(f[None])[0][0, 1:] for f in frames])  # (T, N, 12)
    ours = list(evs.segment_video(model, frames, first_seg, n_last_frames=2, topk=3, size_mask_neighborhood=1))
    official = official_video(feats, first_seg[None], 2, n_last_frames=2, topk=3, size=1)
    assert len(ours) == 6 and all(torch.equal(a, b) for a, b in zip(ours, official))


def test_stretch_rescales_each_positive_map_like_the_official_norm_mask():
    maps = torch.tensor([[[1.0, 3.0]], [[0.0, 0.0]], [[-1.0, -2.0]], [[0.5, 0.5]]])  # (4, 1, 2)
    stretched = evs.stretch(maps.clone())
    assert stretched[:3].tolist() == [[[0.0, 1.0]], [[0.0, 0.0]], [[-1.0, -2.0]]]  # maps with max <= 0 unchanged
    assert stretched[3].tolist() == [[0.0, 0.0]]  # constant: the official divides 0 by 0


def test_frames_are_resized_and_normalised_as_the_official_read_frame():
    rng = np.random.default_rng(0)
    for (H, W), size in [((40, 100), 64), ((100, 70), 64), ((90, 200), 32)]:  # up and down, wide and tall
        frame = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        h, w = evs.frame_size(H, W, size)
        ours = evs.normalize_frame(evs.linear_resize(frame, h, w))
        official = official_read_frame(frame, size)
        assert ours.shape == official.shape == (3, h, w)
        torch.testing.assert_close(ours, official, rtol=0, atol=1e-5)


def test_a_davis_folder_gives_the_masks_of_the_official_script(tmp_path):
    """Frames, first-frame annotation and propagation as the official script, end to end on a tiny ViT."""
    root = tmp_path / "davis"
    os.makedirs(root / "ImageSets" / "2017")
    (root / "ImageSets" / "2017" / "val.txt").write_text("v\n")
    frames, masks = data.render_video(1, n_frames=5, size=48)
    for d in ("JPEGImages", "Annotations"):
        os.makedirs(root / d / "480p" / "v")
    for t in range(5):
        Image.fromarray(frames[t]).resize((90, 50), Image.BICUBIC).save(root / "JPEGImages" / "480p" / "v" /
                                                                        f"{t:05d}.jpg", quality=95)
        Image.fromarray(masks[t]).resize((90, 50), Image.NEAREST).save(root / "Annotations" / "480p" / "v" /
                                                                       f"{t:05d}.png")
    torch.manual_seed(0)
    model = vit.vit_tiny(patch_size=8, depth=1, img_size=32).eval()
    evs.evaluate(model, evs.davis_videos(str(root)), 64, n_last_frames=2, topk=3, size_mask_neighborhood=2,
                 output_dir=str(tmp_path / "out"))
    files = sorted(os.listdir(root / "JPEGImages" / "480p" / "v"))
    with torch.no_grad():
        feats = torch.stack([model.get_intermediate_layers(official_read_frame(np.asarray(Image.open(
            root / "JPEGImages" / "480p" / "v" / f).convert("RGB")), 64)[None])[0][0, 1:] for f in files])
    first_seg = official_read_seg(Image.open(root / "Annotations" / "480p" / "v" / "00000.png"), 8, 64)
    official = official_video(feats, first_seg, 8, n_last_frames=2, topk=3, size=2)
    for t, seg in enumerate(official, start=1):
        seg = np.array(Image.fromarray(seg.numpy().astype(np.uint8)).resize((90, 50), 0))
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "v" / f"{t:05d}.png")), seg)


def test_void_in_davis_annotations_is_read_as_background(tmp_path):
    root = tmp_path / "davis"
    os.makedirs(root / "ImageSets" / "2017")
    (root / "ImageSets" / "2017" / "val.txt").write_text("v\n")
    for d in ("JPEGImages", "Annotations"):
        os.makedirs(root / d / "480p" / "v")
    mask = np.zeros((16, 16), np.uint8)
    mask[4:8, 4:8], mask[3, 3:9] = 1, 255  # an object with a void band along its edge
    for t in range(3):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "JPEGImages" / "480p" / "v" / f"{t:05d}.jpg")
        Image.fromarray(mask).save(root / "Annotations" / "480p" / "v" / f"{t:05d}.png")
    (_, _, annotations), = evs.davis_videos(str(root))
    assert set(np.unique(annotations)) == {0, 1} and annotations[0, 3, 3:9].tolist() == [0] * 6


# --- J and F -----------------------------------------------------------------------------------------------------

def squares():
    gt, pred = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    gt[2:4, 2:4] = True  # a 2 x 2 square ...
    pred[2:4, 3:5] = True  # ... and the same one pixel to the right
    return gt, pred


def test_region_similarity_by_hand():
    gt, pred = squares()
    assert evs.region_similarity(pred, gt) == pytest.approx(2 / 6)  # 2 shared pixels of 6
    assert evs.region_similarity(gt, gt) == 1 and evs.region_similarity(~gt & gt, ~gt & gt) == 1  # both empty


def test_boundary_pixels_sit_half_a_pixel_towards_the_origin():
    gt, _ = squares()
    assert {tuple(p) for p in np.argwhere(evs.boundary_map(gt))} == {
        (1, 1), (1, 2), (1, 3), (2, 1), (3, 1), (2, 3), (3, 2), (3, 3)}


def test_boundary_f_by_hand():
    gt, pred = squares()
    # exact matching: 4 of the 8 boundary pixels on each side coincide (rows 1 and 3, columns 2 and 3)
    assert evs.boundary_f(pred, gt, bound_th=0) == pytest.approx(0.5)
    # the default tolerance, ceil(0.008 x 11.3) = 1 pixel: every boundary pixel has one of the other within 1
    assert evs.boundary_f(pred, gt) == pytest.approx(1.0)
    empty = np.zeros_like(gt)
    assert evs.boundary_f(empty, empty) == 1.0 and evs.boundary_f(empty, gt) == 0.0 and evs.boundary_f(gt, empty) == 0


def test_scores_leave_out_the_first_and_last_frames_and_average_per_object():
    gt = np.zeros((4, 8, 8), np.uint8)
    gt[:, 2:4, 2:4], gt[:, 5:7, 5:7] = 1, 2
    pred = gt.copy()
    pred[1] = np.where(gt[1] == 2, 0, gt[1])  # frame 1 loses object 2
    pred[3] = 0  # the last frame is not scored
    J, Fs = evs.score_video(pred, gt)
    assert J == pytest.approx([1.0, 0.5]) and Fs == pytest.approx([1.0, 0.5])


# --- data and command line -------------------------------------------------------------------------------------

def test_the_synthetic_video_is_deterministic_and_its_objects_move_and_cross():
    frames, masks = data.render_video(3, n_frames=12, size=64)
    again, masks_again = data.render_video(3, n_frames=12, size=64)
    assert frames.shape == (12, 64, 64, 3) and masks.shape == (12, 64, 64)
    assert np.array_equal(frames, again) and np.array_equal(masks, masks_again)
    assert set(np.unique(masks[0])) == {0, 1, 2, 3}
    centre = lambda m, k: np.argwhere(m == k).mean(0)  # noqa: E731
    assert all(np.abs(centre(masks[-1], k) - centre(masks[0], k)).max() > 5 for k in (1, 2, 3))  # they move


@pytest.fixture
def checkpoint(tmp_path):
    """A train.py checkpoint of a 1-block vit_tiny/8 trained at 32 px."""
    torch.manual_seed(0)
    sd = {f"backbone.{k}": v for k, v in vit.vit_tiny(patch_size=8, depth=1, img_size=32).state_dict().items()}
    args = {"arch": "vit_tiny", "patch_size": 8, "depth": 1, "global_size": 32}
    torch.save({"teacher": sd, "student": sd, "args": args}, tmp_path / "checkpoint.pth")
    return str(tmp_path / "checkpoint.pth")


def test_cli_prints_j_and_f_and_writes_indexed_masks(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data, "synthetic_videos", lambda: [("v", *data.render_video(0, n_frames=4, size=48))])
    assert evs.main([checkpoint, "--output_dir", str(tmp_path / "masks")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^J&F-Mean: \d+\.\d\d\nJ-Mean: \d+\.\d\d\nF-Mean: \d+\.\d\d$", out, re.M), out
    assert sorted(os.listdir(tmp_path / "masks" / "v")) == [f"{t:05d}.png" for t in range(4)]
    with Image.open(tmp_path / "masks" / "v" / "00000.png") as im:
        assert im.mode == "P" and im.getpalette()[3:6] == [128, 0, 0]  # DAVIS colours: object 1 dark red
        assert np.array_equal(np.asarray(im), data.render_video(0, n_frames=4, size=48)[1][0])


@pytest.mark.parametrize("flags,message", [(["--data", "nodavis"], "not a DAVIS-2017 folder"),
                                           (["--image_size", "4"], "do not split into 8-pixel patches")])
def test_mistakes_are_one_line(checkpoint, flags, message, capsys, monkeypatch):
    monkeypatch.setattr(data, "synthetic_videos", lambda: [("v", *data.render_video(0, n_frames=3, size=32))])
    assert evs.main([checkpoint, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
