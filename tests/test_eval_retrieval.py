"""Retrieval and copy detection (Sec. 4.2.1): average precision by hand, junk left out of the ranking, the command line
on a tiny model; mAP, multiscale features, --imsize and the Copydays protocol against transcriptions of the official
code."""
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

import data
import eval_retrieval as er
import vit


def test_average_precision_is_the_trapezoid_rule_of_the_oxford_code():
    # query 0 ranks its 2 relevant images 1st and 3rd; query 1 ranks its only relevant image 2nd
    similarity = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5], [0.1, 0.3, 0.9, 0.8, 0.2]])
    relevant = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 0]], dtype=torch.bool)
    ap0 = ((1 + 1) / 2 + (1 / 2 + 2 / 3) / 2) / 2  # j=0 at r=0: (1 + 1/1)/2; j=1 at r=2: (1/2 + 2/3)/2; over 2
    ap1 = (0 / 1 + 1 / 2) / 2  # j=0 at r=1: (0/1 + 1/2)/2
    assert er.mean_average_precision(similarity, relevant) == pytest.approx((ap0 + ap1) / 2)
    assert er.mean_average_precision(similarity[:1], relevant[:1]) == pytest.approx(0.7916666)


def test_a_perfect_ranking_scores_one_and_queries_without_answers_are_left_out():
    similarity = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.4]])
    relevant = torch.tensor([[1, 0, 1], [0, 0, 0]], dtype=torch.bool)
    assert er.mean_average_precision(similarity, relevant) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no query"):
        er.mean_average_precision(similarity[1:], relevant[1:])


def test_junk_images_are_taken_out_of_the_ranking():
    similarity = torch.tensor([[0.9, 0.8, 0.7]])
    relevant = torch.tensor([[0, 1, 0]], dtype=torch.bool)
    junk = torch.tensor([[1, 0, 0]], dtype=torch.bool)
    assert er.mean_average_precision(similarity, relevant) == pytest.approx(0.25)  # 2nd: (0/1 + 1/2) / 2
    assert er.mean_average_precision(similarity, relevant, junk) == pytest.approx(1.0)  # 1st once junk is out


def test_chunks_do_not_change_the_mean():
    g = torch.Generator().manual_seed(0)
    similarity, relevant = torch.rand(37, 50, generator=g), torch.rand(37, 50, generator=g) < 0.2
    relevant[:, 0] = True
    torch.testing.assert_close(er.mean_average_precision(similarity, relevant, chunk_size=5),
                               er.mean_average_precision(similarity, relevant))


def test_revisited_protocols_move_easy_images_between_relevant_and_junk():
    gnd = [{"easy": [0], "hard": [2], "junk": [3]}]
    medium, medium_junk = er.revisited_relevance(gnd, 5, "medium")
    hard, hard_junk = er.revisited_relevance(gnd, 5, "hard")
    assert medium[0].tolist() == [1, 0, 1, 0, 0] and medium_junk[0].tolist() == [0, 0, 0, 1, 0]
    assert hard[0].tolist() == [0, 0, 1, 0, 0] and hard_junk[0].tolist() == [1, 0, 0, 1, 0]


def test_cli_prints_the_map_for_retrieval_and_copy_detection(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DINO_CACHE", str(tmp_path / "cache"))
    folder = data.make_folder_dataset(str(tmp_path / "folder"), 10, 6, size=32)
    torch.manual_seed(0)
    model = vit.vit_tiny(patch_size=8, depth=1, img_size=32)
    sd = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    args = {"arch": "vit_tiny", "patch_size": 8, "depth": 1, "global_size": 32, "data": folder}
    torch.save({"teacher": sd, "student": sd, "args": args}, tmp_path / "checkpoint.pth")
    results = {}
    for mode in ("retrieval", "copydetection"):
        assert er.main([str(tmp_path / "checkpoint.pth"), "--mode", mode, "--num_workers", "0"]) == 0
        out = capsys.readouterr().out
        assert re.search(r"^mAP: \d+\.\d\d$", out, re.M), out
        results[mode] = float(out.split("mAP: ")[1])
    assert "6 strong copies of the val images, 6 originals + 10 train distractors" in out
    assert er.main([str(tmp_path / "checkpoint.pth"), "--multiscale", "--num_workers", "0"]) == 0
    assert "multiscale" in capsys.readouterr().out
    assert 0 < results["retrieval"] <= 100 and 0 < results["copydetection"] <= 100


@pytest.mark.parametrize("argv,message", [(["no_such_checkpoint.pth"], "not found"),
                                          (["--pretrained", "dino_vits32"], "unknown released model"),
                                          (["x.pth", "--copydays", "a", "--revisited", "b"], "not both"),
                                          (["x.pth", "--multiscale", "2"], "expected 0 or 1")])
def test_mistakes_are_one_line(argv, message, capsys):
    assert er.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


# --- the official code, transcribed (facebookresearch/dino utils.py, eval_image_retrieval.py, eval_copy_detection.py)

def official_multi_scale(samples, model):
    v = None
    for s in [1, 1 / 2 ** (1 / 2), 1 / 2]:
        inp = samples.clone() if s == 1 else F.interpolate(samples, scale_factor=s, mode="bilinear",
                                                           align_corners=False)
        feats = model(inp).clone()
        v = feats if v is None else v + feats
    v /= 3
    v /= v.norm()
    return v


def official_compute_ap(ranks, nres):
    ap = 0
    for j, rank in enumerate(ranks):
        precision_0 = 1.0 if rank == 0 else float(j) / rank
        ap += (precision_0 + float(j + 1) / (rank + 1)) * (1.0 / nres) / 2.0
    return ap


def official_compute_map(ranks, gnd):
    """ranks (N, Q): database indices, best first, per query."""
    total, nempty = 0.0, 0
    for i in range(len(gnd)):
        qgnd = np.array(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            nempty += 1
            continue
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], np.array(gnd[i]["junk"]))]
        k = ij = ip = 0
        while len(junk) and ip < len(pos):
            while ij < len(junk) and pos[ip] > junk[ij]:
                k, ij = k + 1, ij + 1
            pos[ip] -= k
            ip += 1
        total += official_compute_ap(pos, len(qgnd))
    return total / (len(gnd) - nempty)


def official_revisited_map(sim_db_q, gnd):
    """eval_image_retrieval.py's Medium and Hard mAP from sim = train_features @ query_features.T."""
    ranks = torch.argsort(-sim_db_q, dim=0).numpy()
    medium = [{"ok": np.concatenate([g["easy"], g["hard"]]), "junk": np.concatenate([g["junk"]])} for g in gnd]
    hard = [{"ok": np.concatenate([g["hard"]]), "junk": np.concatenate([g["junk"], g["easy"]])} for g in gnd]
    return official_compute_map(ranks, medium), official_compute_map(ranks, hard)


def official_copy_features(model, samples):
    feats = model.get_intermediate_layers(samples, n=1)[0].clone()
    cls_output_token = feats[:, 0, :]
    b, h, w, d = len(samples), samples.shape[-2] // model.patch_size, samples.shape[-1] // model.patch_size, \
        feats.shape[-1]
    feats = feats[:, 1:, :].reshape(b, h, w, d).clamp(min=1e-6).permute(0, 3, 1, 2)
    feats = F.avg_pool2d(feats.pow(4), (h, w)).pow(1. / 4).reshape(b, -1)
    return torch.cat((cls_output_token, feats), dim=1)


def official_pca(cov, whit=0.5):
    d, v = np.linalg.eigh(cov)
    eps = d.max() * 1e-5
    d[d < eps] = eps
    idx = np.argsort(d)[::-1][:cov.shape[0]]
    return np.dot(np.diag(1. / d[idx] ** whit), v[:, idx].T)  # dvt


def official_score_ap_from_ranks_1(ranks, nres):
    ap = 0.0
    for ntp, rank in enumerate(ranks):
        precision_0 = 1.0 if rank == 0 else ntp / float(rank)
        ap += ((ntp + 1) / float(rank + 1) + precision_0) * (1.0 / nres) / 2.0
    return ap


# --- against the official code ----------------------------------------------------------------------------------

def test_revisited_map_matches_the_official_compute_map():
    g = torch.Generator().manual_seed(0)
    sim = torch.rand(5, 30, generator=g, dtype=torch.float64)  # (Q, N)
    perm = torch.randperm(30, generator=g).tolist()
    gnd = [{"easy": perm[q:q + 3], "hard": perm[q + 3:q + 5], "junk": perm[q + 5:q + 9]} for q in range(5)]
    gnd[4]["hard"] = []  # no hard image: left out of the Hard mean
    medium, hard = official_revisited_map(sim.T, gnd)
    for protocol, official in (("medium", medium), ("hard", hard)):
        relevant, junk = er.revisited_relevance(gnd, 30, protocol)
        assert er.mean_average_precision(sim, relevant, junk) == pytest.approx(official, abs=1e-12)


def test_multiscale_features_are_the_official_multi_scale():
    torch.manual_seed(0)
    model = vit.vit_tiny(patch_size=8, depth=1, img_size=32).eval()
    x = torch.randn(1, 3, 45, 61)  # odd sizes: every scale drops the pixels past its last patch
    with torch.no_grad():
        torch.testing.assert_close(F.normalize(er.multi_scale(model)(x), dim=1), official_multi_scale(x, model))


def test_imsize_shrinks_the_image_as_the_official_thumbnail(tmp_path):
    path = str(tmp_path / "a.jpg")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 81, 3), dtype=np.uint8)).save(path)
    ours, _ = er.ImageFiles([path], 32)[0]
    img = Image.open(path).convert("RGB")
    img.thumbnail((32, 32), Image.LANCZOS)  # Image.ANTIALIAS in the official code, its old name
    assert ours.shape == (3, 20, 32) and torch.equal(ours, torch.from_numpy(np.array(img)).permute(2, 0, 1))


def test_map_over_the_top_k_is_the_official_copydays_ap():
    g = torch.Generator().manual_seed(1)
    sim, relevant = torch.rand(6, 40, generator=g), torch.rand(6, 40, generator=g) < 0.15
    relevant[:, 39] = True
    ids = sim.topk(20, dim=1).indices
    official = np.mean([official_score_ap_from_ranks_1([r for r, b in enumerate(ids[q].tolist()) if relevant[q, b]],
                                                       int(relevant[q].sum())) for q in range(6)])
    assert er.mean_average_precision(sim, relevant, top=20) == pytest.approx(official)


def test_copydays_protocol_matches_the_official_gem_whitening_and_top20(tmp_path, capsys, monkeypatch):
    """A Copydays-layout folder, distractors and whitening images; a narrow ViT (32-d [CLS] + GeM features)."""
    images = data.generate(40, 5, "val", "scatter", 32)[0]
    layout = {"original": ["2000.jpg", "2001.jpg", "2002.jpg"], "strong": ["2000_a.jpg", "2000_b.jpg", "2002_a.jpg"],
              "jpegqual/50": ["2000.jpg", "2001.jpg", "2002.jpg"], "crops/20": ["2000.jpg", "2001.jpg", "2002.jpg"],
              "distractors": [f"d{i}.jpg" for i in range(20)], "whitening": [f"w{i}.png" for i in range(22)]}
    k = 0
    for folder, names in layout.items():
        os.makedirs(tmp_path / folder)
        for name in names:
            Image.fromarray(images[k % 40]).resize((40 + 3 * k % 17, 32), Image.BICUBIC).save(tmp_path / folder / name)
            k += 1
    torch.manual_seed(0)
    model = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2).eval()
    ckpt = tmp_path / "narrow.pth"
    torch.save(model.state_dict(), ckpt)
    monkeypatch.setitem(vit.ARCHS, "vit_narrow", lambda patch_size=16, **kw: vit.VisionTransformer(
        **{"patch_size": patch_size, "embed_dim": 16, "depth": 1, "num_heads": 2, **kw}))
    assert er.main([str(ckpt), "--arch", "vit_narrow", "--patch", "8", "--copydays", str(tmp_path), "--imsize", "32",
                    "--distractors", str(tmp_path / "distractors"), "--whitening", str(tmp_path / "whitening"),
                    "--num_workers", "0"]) == 0
    out = capsys.readouterr().out
    ours = {m[0]: float(m[1]) for m in re.findall(r"^mAP (\S+): (\d+\.\d\d)$", out, re.M)}

    def official_features(folder):  # ImgListDataset + the transform of eval_copy_detection.extract_features
        files = sorted(os.listdir(tmp_path / folder))
        x = torch.stack([TF.normalize(TF.to_tensor(Image.open(tmp_path / folder / f).convert("RGB").resize(
            (32, 32), Image.BICUBIC)), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) for f in files])
        with torch.no_grad():
            return official_copy_features(model, x)

    database = torch.cat([official_features("original"), official_features("distractors")])
    whit = official_features("whitening")
    dvt = official_pca((whit.T @ whit / len(whit)).numpy())
    database = F.normalize(torch.from_numpy(dvt) @ (database - whit.mean(0)).T, dim=0).T
    for block, names in list(layout.items())[:4]:
        q = F.normalize(torch.from_numpy(dvt) @ (official_features(block) - whit.mean(0)).T, dim=0).T
        ids = (q @ database.T).topk(20, dim=1).indices  # the top 20 of 23
        aps = []
        for i, name in enumerate(names):
            positives = [j for j, o in enumerate(layout["original"]) if o[:4] == name[:4]] if block == "strong" \
                else [i]
            aps.append(official_score_ap_from_ranks_1([r for r, b in enumerate(ids[i].tolist()) if b in positives],
                                                      len(positives)))
        assert ours[block] == pytest.approx(100 * np.mean(aps), abs=0.006), block
    assert f"mAP: {ours['strong']:.2f}" in out
