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
