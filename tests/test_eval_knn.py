"""Weighted k-NN (Sec. 3.2): the vote by hand, edge cases of the official code, checkpoint layouts, the CLI."""
import argparse
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import checkpoint
import eval_knn
import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_vit(patch_size=16, **kw):  # vit_tiny with 2 blocks: fast enough for every test
    return vit.vit_tiny(patch_size, **{"depth": 2, **kw})


@pytest.fixture
def two_blocks(monkeypatch):
    """Files without our args (official, released) build 12 blocks: make vit_tiny/small 2-block models here."""
    monkeypatch.setitem(vit.ARCHS, "vit_tiny", tiny_vit)
    monkeypatch.setitem(vit.ARCHS, "vit_small", lambda patch_size=16, **kw: vit.vit_small(patch_size, depth=2, **kw))


def unit(*angles_deg):  # 2-D unit vectors at the given angles: cosine similarity = cos(angle difference)
    a = torch.tensor(angles_deg, dtype=torch.float64) * math.pi / 180
    return torch.stack((a.cos(), a.sin()), dim=1)  # (n, 2)


def make_image_folder(root, n_per_class=3, size=32):
    """ROOT/{train,val}/{dark,light}/*.png: two classes a k-NN cannot confuse."""
    for split in ("train", "val"):
        for c, value in (("dark", 20), ("light", 230)):
            os.makedirs(os.path.join(root, split, c))
            for i in range(n_per_class):
                img = np.full((size, size, 3), value + 3 * i, dtype=np.uint8)
                Image.fromarray(img).save(os.path.join(root, split, c, f"{i}.png"))
    return str(root)


def save_ours(path, model, **args):
    """Our train.py layout: teacher/student keys `backbone.*` and `head.*`, args a plain dict."""
    sd = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    sd["head.last_layer.weight"] = torch.zeros(8, 4)
    args = {"arch": "vit_tiny", "patch_size": 16, "depth": 2, **args}  # depth: train.py's CPU models are shallower
    torch.save({"teacher": sd, "student": sd, "epoch": 3, "args": args}, path)


# --- the classifier ------------------------------------------------------------------------------------------

def test_temperature_decides_between_the_nearest_neighbour_and_the_majority():
    # one class-0 neighbour at 0 degrees, two class-1 neighbours at 30 and 35 degrees; the test image at 0 degrees
    train, labels = unit(0, 30, 35, 120), torch.tensor([0, 1, 1, 2])
    test, target = unit(0), torch.tensor([0])
    s = [1.0, math.cos(math.radians(30)), math.cos(math.radians(35))]
    for T in (0.07, 1.0):
        vote0, vote1 = math.exp(s[0] / T), math.exp(s[1] / T) + math.exp(s[2] / T)  # by hand
        expected_top1 = 100.0 if vote0 > vote1 else 0.0
        top1, top5 = eval_knn.knn_classifier(train, labels, test, target, k=3, T=T, num_classes=3)
        assert top1 == expected_top1 and top5 == 100.0
    assert math.exp(1 / 0.07) > 2 * math.exp(s[1] / 0.07)  # sharp T: the nearest wins
    assert math.exp(1) < math.exp(s[1]) + math.exp(s[2])  # soft T: the majority wins


def test_top5_counts_only_k_predictions_when_k_is_below_5():
    # nearest neighbour is class 1, the true class 0 is the second nearest; 10 classes
    train, labels = unit(0, 20, 90, 180), torch.tensor([1, 0, 2, 3])
    test, target = unit(0), torch.tensor([0])
    assert eval_knn.knn_classifier(train, labels, test, target, k=1, T=0.07, num_classes=10) == (0.0, 0.0)
    assert eval_knn.knn_classifier(train, labels, test, target, k=2, T=0.07, num_classes=10) == (0.0, 100.0)


def reference_knn(train, train_labels, test, test_labels, k, T, C):
    """The paper's rule written one test image at a time, with explicit one-hot votes."""
    top1 = top5 = 0
    for x, y in zip(test, test_labels):
        sim, idx = (train @ x).topk(k)
        votes = (F.one_hot(train_labels[idx], C).double() * (sim / T).exp()[:, None]).sum(0)  # (C,)
        order = votes.sort(descending=True, stable=True).indices
        top1 += int(order[0] == y)
        top5 += int(y in order[:min(5, k, C)])
    return 100.0 * top1 / len(test), 100.0 * top5 / len(test)


@pytest.mark.parametrize("num_test, chunk_size", [(23, 100), (23, 7), (250, 100), (1, 100)])
@pytest.mark.parametrize("num_classes", [3, 12])
def test_any_number_of_test_images_and_classes_matches_the_reference(num_test, chunk_size, num_classes):
    g = torch.Generator().manual_seed(num_test + num_classes)
    train = F.normalize(torch.randn(60, 8, generator=g, dtype=torch.float64), dim=1)
    test = F.normalize(torch.randn(num_test, 8, generator=g, dtype=torch.float64), dim=1)
    train_labels = torch.randint(num_classes, (60,), generator=g)
    test_labels = torch.randint(num_classes, (num_test,), generator=g)
    for k in (1, 4, 10):
        got = eval_knn.knn_classifier(train, train_labels, test, test_labels, k, 0.07, num_classes, chunk_size)
        assert got == pytest.approx(reference_knn(train, train_labels, test, test_labels, k, 0.07, num_classes))


def test_k_larger_than_the_training_set_uses_every_training_image():
    train, labels = unit(0, 10, 180), torch.tensor([0, 0, 1])
    top1, top5 = eval_knn.knn_classifier(train, labels, unit(5, 175), torch.tensor([0, 1]), k=200, T=0.07)
    assert (top1, top5) == (100.0, 100.0)


# --- features and the online monitor -------------------------------------------------------------------------

class ToyImages(torch.utils.data.Dataset):
    """uint8 images of constant brightness: label 0 dark, label 1 light."""

    def __init__(self, n):
        self.targets = [i % 2 for i in range(n)]
        self.classes = ["dark", "light"]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        value = 30 + i if self.targets[i] == 0 else 220 - i
        return torch.full((3, 32, 32), value, dtype=torch.uint8), self.targets[i]


def test_extract_features_keeps_dataset_order_and_labels():
    ds = ToyImages(7)
    feats, labels = eval_knn.extract_features(lambda x: x.mean(dim=(2, 3)), ds, torch.device("cpu"), batch_size=3)
    assert feats.shape == (7, 3) and labels.tolist() == ds.targets
    expected = torch.stack([eval_knn.augment.normalize(ds[i][0][None]).mean(dim=(2, 3))[0] for i in range(7)])
    torch.testing.assert_close(feats, expected)


def test_knn_monitor_separates_dark_from_light_and_restores_train_mode():
    model = tiny_vit().train()
    top1 = eval_knn.monitor_top1(model, ToyImages(10), ToyImages(6), torch.device("cpu"), k=3, batch_size=4)
    assert top1 == 100.0 and model.training


# --- checkpoints ---------------------------------------------------------------------------------------------

def test_loads_our_checkpoint_layout(tmp_path):
    source, x = tiny_vit().eval(), torch.randn(2, 3, 32, 32)
    save_ours(tmp_path / "checkpoint.pth", source, global_size=64, data="scatter")
    model, saved = vit.from_checkpoint(str(tmp_path / "checkpoint.pth"))
    assert saved["global_size"] == 64 and checkpoint.eval_image_size(None, saved) == 64
    torch.testing.assert_close(model.eval()(x), source(x))


def test_loads_official_training_checkpoint_layout(tmp_path, two_blocks):
    teacher, student, x = tiny_vit().eval(), tiny_vit().eval(), torch.randn(2, 3, 32, 32)
    ckpt = {"teacher": {f"backbone.{k}": v for k, v in teacher.state_dict().items()},
            "student": {f"module.backbone.{k}": v for k, v in student.state_dict().items()},
            "optimizer": {}, "epoch": 100, "args": argparse.Namespace(arch="vit_tiny", patch_size=16, lr=0.0005)}
    ckpt["student"]["module.head.mlp.0.weight"] = torch.zeros(4, 192)
    torch.save(ckpt, tmp_path / "official.pth")
    for key, source in (("teacher", teacher), ("student", student)):
        model, saved = vit.from_checkpoint(str(tmp_path / "official.pth"), checkpoint_key=key)
        assert checkpoint.eval_image_size(None, saved) == 224
        assert "data" not in saved  # no data saved: the scripts fall back to data.DEFAULT_DATA
        torch.testing.assert_close(model.eval()(x), source(x))


def test_bare_backbone_needs_arch_and_patch_and_a_wrong_arch_is_named(tmp_path, two_blocks):
    torch.save(tiny_vit().state_dict(), tmp_path / "bare.pth")
    with pytest.raises(ValueError, match="--arch and --patch"):
        vit.from_checkpoint(str(tmp_path / "bare.pth"))
    vit.from_checkpoint(str(tmp_path / "bare.pth"), arch="vit_tiny", patch_size=16)
    with pytest.raises(ValueError, match="does not fit"):
        vit.from_checkpoint(str(tmp_path / "bare.pth"), arch="vit_small", patch_size=16)


# --- command line --------------------------------------------------------------------------------------------

def test_cli_prints_one_result_line_per_k_and_reloads_dumped_features(tmp_path, capsys):
    data = make_image_folder(tmp_path / "imgs")
    save_ours(tmp_path / "checkpoint.pth", tiny_vit(), global_size=32, data=data)
    argv = [str(tmp_path / "checkpoint.pth"), "--nb_knn", "1", "3", "--num_workers", "0"]
    assert eval_knn.main(argv + ["--dump_features", str(tmp_path / "feats")]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "NN classifier" in ln]
    assert len(lines) == 2 and re.fullmatch(r"1-NN classifier result: Top1: [\d.]+, Top5: [\d.]+", lines[0])
    assert eval_knn.main(["--load_features", str(tmp_path / "feats"), "--nb_knn", "1", "3"]) == 0
    assert [ln for ln in capsys.readouterr().out.splitlines() if "NN classifier" in ln] == lines


@pytest.mark.parametrize("case", ["missing", "not_a_checkpoint"])
def test_cli_reports_a_bad_checkpoint_in_one_line(tmp_path, case):
    path = tmp_path / "file.pth"
    if case == "not_a_checkpoint":
        path.write_text("these are not weights\n")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "eval_knn.py"), str(path)], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: ")


def test_baselines_random_init_and_raw_pixels_differ_from_the_trained_features(tmp_path, capsys):
    data = make_image_folder(tmp_path / "imgs")
    torch.manual_seed(3)
    save_ours(tmp_path / "checkpoint.pth", tiny_vit(), global_size=32, data=data)
    argv = [str(tmp_path / "checkpoint.pth"), "--nb_knn", "1", "--num_workers", "0", "--dump_features"]
    results = {}
    for mode in ("trained", "random_init", "raw_pixels"):
        flags = [] if mode == "trained" else [f"--{mode}"]
        assert eval_knn.main(argv + [str(tmp_path / mode)] + flags) == 0
        results[mode] = torch.load(tmp_path / mode / "trainfeat.pth")
    assert results["raw_pixels"].shape[1] == 3 * 32 * 32  # the pixels themselves
    assert results["random_init"].shape == results["trained"].shape
    assert not torch.allclose(results["random_init"], results["trained"])  # other weights, same shape
    assert "random init" in capsys.readouterr().out


def test_few_labels_keep_n_training_images_a_class_and_the_whole_val_set(tmp_path, capsys):
    data = make_image_folder(tmp_path / "imgs", n_per_class=4)
    save_ours(tmp_path / "checkpoint.pth", tiny_vit(), global_size=32, data=data)
    argv = [str(tmp_path / "checkpoint.pth"), "--nb_knn", "1", "--num_workers", "0", "--labels_per_class"]
    assert eval_knn.main([*argv, "1", "--dump_features", str(tmp_path / "feats")]) == 0
    assert "1-NN classifier result: Top1:" in capsys.readouterr().out
    labels = [torch.load(tmp_path / "feats" / f, weights_only=True).tolist() for f in ("trainlabels.pth",
                                                                                     "testlabels.pth")]
    assert sorted(labels[0]) == [0, 1] and sorted(labels[1]) == [0] * 4 + [1] * 4
    for bad in ("0", "5"):
        assert eval_knn.main([*argv, bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --labels_per_class") and len(err.strip().splitlines()) == 1
