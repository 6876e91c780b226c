"""The paper's ResNet-50 (Table 2) and the official optimizers: torchvision's ResNet with fc = Identity as the
backbone, --optimizer {adamw,sgd,lars} with the official semantics, the official README's ResNet-50 recipe, and a
ResNet checkpoint through the evaluations that make sense for a convnet."""
import os
import re

import pytest
import torch
import torchvision

import data
import distributed
import eval_knn
import eval_linear
import eval_retrieval
import train
import variants  # noqa: F401  (lab/variants.py: the lab's datasets; the tiny runs here draw from "shapes")
import vit


@torch.no_grad()
def official_lars_step(params, states, lr, weight_decay, momentum=0.9, eta=0.001):
    """One step of the official utils.LARS (facebookresearch/dino, from Barlow Twins), transcribed: `states` holds
    each parameter's momentum buffer `mu` (a dict, empty before the first step)."""
    for p, state in zip(params, states):
        dp = p.grad
        if p.ndim != 1:
            dp = dp.add(p, alpha=weight_decay)
        if p.ndim != 1:
            param_norm = torch.norm(p)
            update_norm = torch.norm(dp)
            one = torch.ones_like(param_norm)
            q = torch.where(param_norm > 0., torch.where(update_norm > 0, (eta * param_norm / update_norm), one), one)
            dp = dp.mul(q)
        if "mu" not in state:
            state["mu"] = torch.zeros_like(p)
        mu = state["mu"]
        mu.mul_(momentum).add_(dp)
        p.add_(mu, alpha=-lr)


def test_lars_steps_as_the_official_lars_with_no_decay_and_no_trust_ratio_for_1d_parameters():
    torch.manual_seed(0)
    shapes = [(4, 3), (5,), (2, 3, 3, 3), (4, 3), (4, 3)]  # a matrix, a bias, a conv, a zero matrix, no gradient
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ours[3].data.zero_()  # ‖p‖ = 0: the trust ratio is 1
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    # the bias sits in the decayed group on purpose: a 1-D parameter is never decayed, whatever its group says
    optimizer = distributed.LARS([{"params": ours[:4]}, {"params": ours[4:], "weight_decay": 0.0}])
    states = [{} for _ in theirs]
    bias, bias_grads = ours[1].detach().clone(), []
    for step in range(2):  # the second step also checks the momentum buffers
        grads = [torch.randn(s) for s in shapes]
        bias_grads.append(grads[1])
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours[4].grad = theirs[4].grad = torch.zeros(shapes[4])  # ‖g‖ = 0 and wd 0: the trust ratio is 1
        for group in optimizer.param_groups:
            group["lr"], group["weight_decay"] = 0.5, (0.1 if group is optimizer.param_groups[0] else 0.0)
        optimizer.step()
        official_lars_step(theirs[:4], states[:4], lr=0.5, weight_decay=0.1)
        official_lars_step(theirs[4:], states[4:], lr=0.5, weight_decay=0.0)
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    g1, g2 = bias_grads  # by hand, the bias: plain momentum SGD, μ = g1, then μ = 0.9 g1 + g2
    torch.testing.assert_close(ours[1].detach(), bias - 0.5 * g1 - 0.5 * (0.9 * g1 + g2))


def test_the_optimizer_flag_gives_adamw_sgd_with_momentum_or_lars(tmp_path):
    model = train.MultiCropWrapper(vit.resnet("resnet18"), torch.nn.Linear(512, 8))
    groups = lambda: train.param_groups(model)  # noqa: E731
    cpu = torch.device("cpu")
    assert isinstance(train.build_optimizer("adamw", groups(), cpu), torch.optim.AdamW)
    sgd = train.build_optimizer("sgd", groups(), cpu)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.9
    assert isinstance(train.build_optimizer("lars", groups(), cpu), distributed.LARS)
    with pytest.raises(train.UserError, match="unknown --optimizer lasr"):
        train.get_args(["--optimizer", "lasr", "--output_dir", str(tmp_path)])


def test_a_resnet_backbone_is_torchvisions_with_fc_replaced_by_identity():
    model = vit.backbone("resnet18", patch_size=16, depth=4, img_size=64, drop_path_rate=0.1)  # ViT keywords: unused
    reference = torchvision.models.resnet18()
    reference.fc = torch.nn.Identity()
    assert model.embed_dim == 512 and isinstance(model.fc, torch.nn.Identity)
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert vit.resnet("resnet50").embed_dim == 2048 and "resnet50" in vit.RESNETS


def test_preset_paper_with_a_resnet_is_the_official_resnet50_recipe(tmp_path, capsys):
    args = train.get_args(["--preset", "paper", "--arch", "resnet50", "--output_dir", str(tmp_path)])
    assert (args.optimizer, args.lr, args.weight_decay, args.weight_decay_end) == ("sgd", 0.03, 1e-4, 1e-4)
    assert args.global_crops_scale == (0.14, 1.0) and args.local_crops_scale == (0.05, 0.14)
    assert args.out_dim == 65536 and args.epochs == 100  # the rest is the paper's
    vit_args = train.get_args(["--preset", "paper", "--output_dir", str(tmp_path)])
    assert (vit_args.optimizer, vit_args.lr, vit_args.global_crops_scale) == ("adamw", 0.0005, (0.4, 1.0))
    mine = train.get_args(["--preset", "paper", "--arch", "resnet50", "--lr", "0.1", "--optimizer", "lars",
                           "--output_dir", str(tmp_path)])
    assert (mine.lr, mine.optimizer) == (0.1, "lars")  # explicit flags still win
    with pytest.raises(SystemExit):
        train.get_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for key, value in train.PAPER_RESNET.items():
        assert f"paper: {train.PRESETS['paper'][key]}; paper with a ResNet: {value})" in help_text, key


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    """One epoch of DINO on a ResNet-18 with SGD on 32 px images (global 32 px, local 24 px) and its checkpoint."""
    root = tmp_path_factory.mktemp("resnet")
    folder = data.make_folder_dataset(str(root / "imgs"), n_train=32, n_val=20, size=32, variant="shapes")
    out = root / "out"
    train.main(train.get_args(["--data", folder, "--arch", "resnet18", "--optimizer", "sgd", "--out_dim", "32",
                               "--global_size", "32", "--local_size", "24", "--local_crops_number", "2",
                               "--batch_size", "8", "--epochs", "1", "--num_workers", "0", "--output_dir", str(out)]))
    return folder, out


def test_a_resnet_trained_with_sgd_evaluates_with_knn_linear_and_retrieval(resnet_run, capsys):
    folder, out = resnet_run
    ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
    assert ckpt["args"]["weight_decay"] == 1e-4 and "momentum_buffer" in str(ckpt["optimizer"]["state"])
    teacher = {k[len("backbone."):]: v for k, v in ckpt["teacher"].items() if k.startswith("backbone.")}
    assert teacher.keys() == vit.resnet("resnet18").state_dict().keys()  # the official layout: loads anywhere
    ckpt_path = str(out / "checkpoint.pth")
    common = [ckpt_path, "--num_workers", "0"]
    assert eval_knn.main(common + ["--nb_knn", "5"]) == 0
    assert eval_linear.main(common + ["--epochs", "2"]) == 0
    assert eval_retrieval.main(common) == 0
    printed = capsys.readouterr().out
    assert "resnet18 (teacher)" in printed and re.search(r"5-NN classifier result: Top1: [\d.]+", printed)
    assert "features: pooled last stage = 512-d" in printed and re.search(r"Linear probe result: Top1: [\d.]+", printed)
    assert re.search(r"\nmAP: [\d.]+", printed)


def test_lars_trains_a_resnet(resnet_run, tmp_path):
    folder, _ = resnet_run
    train.main(train.get_args(["--data", folder, "--arch", "resnet18", "--optimizer", "lars", "--out_dim", "32",
                               "--global_size", "32", "--local_size", "24", "--local_crops_number", "1",
                               "--batch_size", "16", "--epochs", "1", "--num_workers", "0",
                               "--output_dir", str(tmp_path)]))
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    assert ckpt["args"]["optimizer"] == "lars" and "mu" in str(ckpt["optimizer"]["state"])


def test_the_docs_state_the_resnet_recipe_that_the_code_uses():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for doc in ("docs/cpu_recipe.md", "docs/scaling.md"):
        with open(os.path.join(root, doc)) as f:
            words = f.read().replace("`", " ").split()
        start = next(i for i in range(len(words)) if words[i:i + 2] == ["--optimizer", "sgd"])  # the recipe
        for key, value in train.PAPER_RESNET.items():
            at = words.index(f"--{key}", start)
            expected = value if isinstance(value, tuple) else (value,)
            given = [w if isinstance(v, str) else float(w) for w, v in zip(words[at + 1:], expected)]
            assert given == list(expected), (doc, key)
