"""Linear probe (Sec. 3.2, App.): the features the official code feeds the layer, training, the CLI."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import eval_linear
import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_vit(patch_size=16, depth=2):  # vit_tiny with few blocks: fast enough for every test
    return vit.vit_tiny(patch_size, depth=depth)


def make_image_folder(root, n_per_class=3, size=32):
    """ROOT/{train,val}/{dark,light}/*.png: two easy classes."""
    for split in ("train", "val"):
        for c, value in (("dark", 20), ("light", 230)):
            os.makedirs(os.path.join(root, split, c))
            for i in range(n_per_class):
                Image.fromarray(np.full((size, size, 3), value + 3 * i, np.uint8)).save(
                    os.path.join(root, split, c, f"{i}.png"))
    return str(root)


def test_block_features_are_the_official_concatenations():
    model, x = tiny_vit(depth=3).eval(), torch.randn(2, 3, 32, 32)
    blocks = model.get_intermediate_layers(x, 3)  # 3 x (B, 1+N, D)
    # ViT-S recipe: [CLS] of the last n blocks, in block order
    torch.testing.assert_close(eval_linear.block_features(model, x, 2, False),
                               torch.cat((blocks[1][:, 0], blocks[2][:, 0]), dim=1))  # (B, 2D)
    torch.testing.assert_close(eval_linear.block_features(model, x, 1, False), model(x))  # last [CLS] = forward
    # ViT-B recipe: last [CLS] and mean patch token, interleaved as the official reshape leaves them
    out = eval_linear.block_features(model, x, 1, True)  # (B, 2D)
    assert out.shape == (2, 2 * 192)
    torch.testing.assert_close(out[:, 0::2], blocks[2][:, 0])
    torch.testing.assert_close(out[:, 1::2], blocks[2][:, 1:].mean(dim=1))


def test_linear_layer_starts_as_the_official_one():
    layer = eval_linear.LinearClassifier(1000, 100).linear
    assert layer.bias.abs().sum() == 0 and abs(layer.weight.std().item() - 0.01) < 1e-3


def separable_features(n, g, dim=16, margin=0.5):
    """4 classes = the 4 quadrants of two random hyperplanes, pushed `margin` away from them: linearly separable."""
    w = torch.nn.functional.normalize(torch.randn(2, dim, generator=torch.Generator().manual_seed(0)), dim=1)
    x = torch.randn(n, dim, generator=g)  # (n, dim)
    side = (x @ w.t() > 0).float()  # (n, 2)
    x = x + margin * (2 * side - 1) @ w  # (n, dim)
    return x, (2 * side[:, 0] + side[:, 1]).long()


def test_linear_probe_learns_linearly_separable_features():
    g = torch.Generator().manual_seed(1)
    train, val = separable_features(512, g), separable_features(256, g)
    torch.manual_seed(0)
    linear = eval_linear.LinearClassifier(16, 4)
    val_loader = eval_linear.CachedFeatures(*val, batch_size=256)
    before = eval_linear.validate(linear, val_loader, lambda x: x, "cpu")["acc1"]
    best, last = eval_linear.train_linear(linear, eval_linear.CachedFeatures(*train, 256, shuffle=True), val_loader,
                                          epochs=20, lr=1.0, device="cpu", log=lambda s: None)
    assert before < 50 and last["acc1"] >= 98 and best >= last["acc1"]


def test_top5_accuracy_counts_the_five_best_classes():
    linear = eval_linear.LinearClassifier(6, 6)
    with torch.no_grad():
        linear.linear.weight.copy_(torch.eye(6))
    features = torch.tensor([[0.0, 5, 4, 3, 2, 1], [9.0, 0, 0, 0, 0, 0]])  # target 2 is 2nd; target 0 is 1st
    stats = eval_linear.validate(linear, [(features, torch.tensor([2, 0]))], lambda x: x, "cpu")
    assert stats["acc1"] == 50.0 and stats["acc5"] == 100.0


def test_cached_batches_visit_every_sample_once_per_epoch_in_a_new_order():
    loader = eval_linear.CachedFeatures(torch.arange(10.0)[:, None], torch.arange(10), batch_size=4, shuffle=True)
    orders = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        orders.append(torch.cat([y for _, y in loader]).tolist())
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(10)) and orders[0] != orders[1]


def tiny_checkpoint(tmp_path, n_per_class=3):
    data = make_image_folder(tmp_path / "imgs", n_per_class)
    sd = {f"backbone.{k}": v for k, v in tiny_vit(depth=4).state_dict().items()}
    args = {"arch": "vit_tiny", "patch_size": 16, "depth": 4, "global_size": 32, "data": data}
    torch.save({"teacher": sd, "args": args}, tmp_path / "checkpoint.pth")
    return sd, args


@pytest.mark.parametrize("cache", ["1", "0"])
def test_cli_trains_and_saves_the_linear_layer(tmp_path, capsys, cache):
    tiny_checkpoint(tmp_path)
    argv = [str(tmp_path / "checkpoint.pth"), "--epochs", "2", "--num_workers", "0", "--cache_features", cache]
    assert eval_linear.main(argv) == 0
    assert "Linear probe result: Top1:" in capsys.readouterr().out
    linear = torch.load(tmp_path / "linear.pth", weights_only=True)  # next to the checkpoint by default
    assert linear["linear.weight"].shape == (2, 4 * 192)  # 2 classes, [CLS] of the last 4 blocks
    assert len((tmp_path / "linear_log.txt").read_text().splitlines()) == 2


def test_cli_reports_a_bare_backbone_without_arch_in_one_line(tmp_path):
    torch.save(tiny_vit().state_dict(), tmp_path / "bare.pth")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "eval_linear.py"), str(tmp_path / "bare.pth")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "--arch" in r.stderr


def test_finetuning_trains_the_backbone_at_its_own_lower_rate_and_the_layer(tmp_path, capsys):
    sd, _ = tiny_checkpoint(tmp_path)
    argv = [str(tmp_path / "checkpoint.pth"), "--finetune", "--epochs", "2", "--num_workers", "0"]
    assert eval_linear.main(argv) == 0
    assert "Fine-tuning result: Top1:" in capsys.readouterr().out
    tuned = torch.load(tmp_path / "finetune.pth", weights_only=True)["model"]
    assert tuned["linear.linear.weight"].shape == (2, 4 * 192)
    assert not torch.equal(tuned["backbone.blocks.3.mlp.fc2.weight"], sd["backbone.blocks.3.mlp.fc2.weight"])
    assert len((tmp_path / "finetune_log.txt").read_text().splitlines()) == 2
    model = eval_linear.FineTuned(tiny_vit(), lambda x: x[:, 0, 0, :2], eval_linear.LinearClassifier(2, 2))
    groups = eval_linear.finetune_optimizer(model, 1e-3, 0.1).param_groups
    assert [g["lr"] for g in groups] == [1e-3, 1e-3, 1e-4, 1e-4]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_random_init_finetuned_with_a_still_backbone_keeps_the_seed_0_network(tmp_path):
    sd, args = tiny_checkpoint(tmp_path)
    argv = [str(tmp_path / "checkpoint.pth"), "--finetune", "--random_init", "--backbone_lr_scale", "0",
            "--epochs", "1", "--num_workers", "0"]
    assert eval_linear.main(argv) == 0
    torch.manual_seed(0)
    expected = vit.build_like(args).state_dict()  # what eval_knn.py --random_init evaluates
    tuned = torch.load(tmp_path / "finetune.pth", weights_only=True)["model"]
    for k, v in expected.items():
        assert torch.equal(tuned[f"backbone.{k}"], v), k
    assert not torch.equal(tuned["backbone.blocks.0.attn.qkv.weight"], sd["backbone.blocks.0.attn.qkv.weight"])


def test_few_labels_train_on_n_images_a_class_and_a_bad_n_is_one_line(tmp_path, capsys):
    tiny_checkpoint(tmp_path, n_per_class=4)
    argv = [str(tmp_path / "checkpoint.pth"), "--epochs", "1", "--num_workers", "0", "--labels_per_class"]
    assert eval_linear.main([*argv, "2"]) == 0
    out = capsys.readouterr().out
    assert "4 train / 8 val images" in out and "Linear probe result: Top1:" in out
    for bad in ("0", "5"):
        assert eval_linear.main([*argv, bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --labels_per_class") and len(err.strip().splitlines()) == 1
