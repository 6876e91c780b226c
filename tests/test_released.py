"""Released DINO weights by name: torch.hub's cache (used without network), failed and corrupt downloads, hubconf.py
with a local checkout (the ViTs and the ResNet-50), and --pretrained on the command line. The network is never
touched: every download is faked."""
import os
import re
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import checkpoint
import eval_knn
import eval_video_segmentation
import visualize_attention
import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_vit_small(patch_size=16, **kw):  # the official ViT-S/16 layout with 2 blocks: every key, few weights
    return vit.vit_small(patch_size, **{"depth": 2, **kw})


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty TORCH_HOME and no network: a download attempt fails the test unless the test fakes one."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def no_network(url, dst, *args, **kwargs):
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


@pytest.fixture
def released_vits16(hub, monkeypatch):
    """A 2-block ViT-S/16 saved in the cache under the official name, as a released file (a bare state dict)."""
    monkeypatch.setitem(vit.ARCHS, "vit_small", small_vit_small)
    torch.manual_seed(0)
    model = small_vit_small().eval()
    os.makedirs(hub)
    torch.save(model.state_dict(), hub / "dino_deitsmall16_pretrain.pth")
    return model


def test_names_urls_and_cache_paths_are_the_official_ones(hub):
    assert checkpoint.released_url("dino_vits8") == \
        "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth"
    assert checkpoint.released_url("dino_vitb16") == \
        "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"
    assert checkpoint.released_path("dino_vitb8") == str(hub / "dino_vitbase8_pretrain.pth")
    assert {n: a[:2] for n, a in checkpoint.RELEASED.items()} == {
        "dino_vits16": ("vit_small", 16), "dino_vits8": ("vit_small", 8),
        "dino_vitb16": ("vit_base", 16), "dino_vitb8": ("vit_base", 8), "dino_resnet50": ("resnet50", None),
        "dino_vits8_300ep": ("vit_small", 8), "dino_vits16_gldv2": ("vit_small", 16)}
    assert checkpoint.released_url("dino_resnet50") == \
        "https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth"
    assert checkpoint.released_path("dino_resnet50") == str(hub / "dino_resnet50_pretrain.pth")
    assert checkpoint.released_url("dino_vits16_gldv2") == "https://dl.fbaipublicfiles.com/dino/" \
        "dino_vitsmall16_googlelandmark_pretrain/dino_vitsmall16_googlelandmark_pretrain.pth"
    assert checkpoint.released_path("dino_vits8_300ep") == str(hub / "dino_deitsmall8_300ep_pretrain.pth")


def test_a_file_in_the_cache_is_used_without_network(hub):
    os.makedirs(hub)
    torch.save({"w": torch.arange(3.0)}, hub / "dino_deitsmall8_pretrain.pth")
    assert torch.equal(checkpoint.load_released("dino_vits8")["w"], torch.arange(3.0))


def test_the_official_scripts_default_weights_are_named_and_read_from_the_cache(hub, monkeypatch):
    monkeypatch.setitem(vit.ARCHS, "vit_small", small_vit_small)
    os.makedirs(hub)
    for name, file in (("dino_vits8_300ep", "dino_deitsmall8_300ep_pretrain.pth"),
                       ("dino_vits16_gldv2", "dino_vitsmall16_googlelandmark_pretrain.pth")):
        torch.manual_seed(len(name))
        source = small_vit_small(patch_size=checkpoint.RELEASED[name][1])
        torch.save(source.state_dict(), hub / file)
        assert torch.equal(vit.released(name).pos_embed, source.pos_embed)


def test_an_unknown_name_is_one_error_naming_the_choices(hub):
    with pytest.raises(checkpoint.CheckpointError, match="choose from dino_vits16, dino_vits8"):
        checkpoint.load_released("dino_vits32")


def test_an_offline_download_is_one_error_and_leaves_nothing(hub, monkeypatch):
    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load_released("dino_vits16")
    assert "could not download dino_vits16" in str(e.value) and "\n" not in str(e.value)
    assert str(hub / "dino_deitsmall16_pretrain.pth") in str(e.value)  # where to put the file by hand
    assert os.listdir(hub) == []


def test_a_download_that_is_not_a_checkpoint_is_removed(hub, monkeypatch):
    def proxy_page(url, dst, *args, **kwargs):  # a complete download of the wrong thing
        with open(dst, "w") as f:
            f.write("<html>blocked by proxy</html>")

    monkeypatch.setattr(torch.hub, "download_url_to_file", proxy_page)
    with pytest.raises(checkpoint.CheckpointError, match="not a readable checkpoint.*nothing was kept"):
        checkpoint.load_released("dino_vitb16")
    assert os.listdir(hub) == []


def test_a_corrupt_file_in_the_cache_is_named_and_kept(hub):
    os.makedirs(hub)
    (hub / "dino_vitbase8_pretrain.pth").write_bytes(b"\x80\x02truncated")
    with pytest.raises(checkpoint.CheckpointError, match="delete it to download it again"):
        checkpoint.load_released("dino_vitb8")
    assert os.listdir(hub) == ["dino_vitbase8_pretrain.pth"]  # the user's file: we say what is wrong with it


def test_torch_hub_load_of_a_local_checkout_gives_our_model_with_the_released_weights(released_vits16):
    model = torch.hub.load(ROOT, "dino_vits16", source="local")
    assert isinstance(model, vit.VisionTransformer) and len(model.blocks) == 2
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), released_vits16(x), rtol=0, atol=0)
    untrained = torch.hub.load(ROOT, "dino_vits16", source="local", pretrained=False)
    assert not torch.equal(untrained.cls_token, model.cls_token)


def test_hub_entry_points_take_the_official_keyword_arguments(released_vits16):
    model = torch.hub.load(ROOT, "dino_vits16", source="local", pretrained=True, num_classes=0, img_size=[224],
                           qkv_bias=True, drop_path_rate=0.1)
    assert torch.equal(model.cls_token, released_vits16.cls_token) and model.blocks[1].drop_path == pytest.approx(0.1)
    with pytest.raises(ValueError, match="num_classes=0 is the only value"):
        torch.hub.load(ROOT, "dino_vits16", source="local", num_classes=1000)


def image_folder(folder):
    """Two classes (dark, light) of two 32 px images each, in train/ and val/."""
    for split in ("train", "val"):
        for c, value in (("dark", 20), ("light", 230)):
            os.makedirs(folder / split / c)
            for i in range(2):
                Image.fromarray(np.full((32, 32, 3), value + 5 * i, np.uint8)).save(folder / split / c / f"{i}.png")
    return folder


def test_pretrained_on_the_command_line_reads_the_cache(released_vits16, tmp_path, capsys):
    folder = image_folder(tmp_path / "imgs")
    argv = ["--pretrained", "dino_vits16", "--data", str(folder), "--image_size", "32", "--num_workers", "0"]
    assert eval_knn.main(argv + ["--nb_knn", "1"]) == 0
    out = capsys.readouterr().out
    assert "vit_small/16, 2 blocks (dino_vits16)" in out and re.search(r"1-NN classifier result: Top1: 100.0", out)
    image = folder / "val" / "dark" / "0.png"
    assert visualize_attention.main(["--pretrained", "dino_vits16", "--image", str(image), "--image_size", "32",
                                     "--output_dir", str(tmp_path / "attn")]) == 0
    assert len(os.listdir(tmp_path / "attn")) == 2 + 2 * 6  # image, overlay, and each of the 6 heads' map and mask


def test_a_folder_of_images_gives_one_sheet_each(released_vits16, tmp_path):
    for name, size in (("a.png", (40, 32)), ("b.jpg", (32, 48))):
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    out = tmp_path / "sheets"
    assert visualize_attention.main(["--pretrained", "dino_vits16", "--image", str(tmp_path), "--image_size", "32",
                                     "--output_dir", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["a.png", "b.png"]
    with Image.open(out / "a.png") as im:  # 2 rows of 32 px, 1 + 6 columns of 32 px (40 -> 32 wide), 4 px gaps
        assert im.size == (7 * 32 + 6 * 4, 2 * 32 + 4)


def test_released_resnet50_through_the_hub_cache_is_torchvisions_resnet50_and_serves_knn(hub, tmp_path, capsys):
    torch.manual_seed(0)
    source = torchvision.models.resnet50().eval()  # the official layout: torchvision's resnet50 without its fc
    source.fc = torch.nn.Identity()
    os.makedirs(hub)
    torch.save(source.state_dict(), hub / "dino_resnet50_pretrain.pth")
    model = torch.hub.load(ROOT, "dino_resnet50", source="local").eval()
    assert type(model) is torchvision.models.ResNet
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=1e-5)  # (2, 2048) pooled features
    folder = image_folder(tmp_path / "imgs")
    assert eval_knn.main(["--pretrained", "dino_resnet50", "--data", str(folder), "--image_size", "32",
                          "--num_workers", "0", "--nb_knn", "1"]) == 0
    out = capsys.readouterr().out
    assert "resnet50 (dino_resnet50)" in out and re.search(r"1-NN classifier result: Top1: [\d.]+", out)


@pytest.mark.parametrize("script", [visualize_attention, eval_video_segmentation])
def test_evaluations_that_need_a_vit_answer_a_resnet_in_one_line_before_reading_weights(hub, script, tmp_path, capsys):
    # the hub cache is empty and the network is off: the answer comes before any download is tried
    extra = ["--image", "docs/example.png", "--output_dir", str(tmp_path)] if script is visualize_attention else []
    assert script.main(["--pretrained", "dino_resnet50", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: resnet50 is a convnet") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv,message", [
    (["--pretrained", "dino_vitl16"], "unknown released model 'dino_vitl16'"),
    (["x.pth", "--pretrained", "dino_vits16"], "not both"),
])
def test_pretrained_mistakes_are_one_line(hub, argv, message, tmp_path, capsys):
    assert visualize_attention.main(argv + ["--image", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_full_size_released_vits16_serves_the_hub_knn_and_attention_offline(hub, tmp_path, capsys):
    torch.manual_seed(0)
    source = vit.vit_small(patch_size=16).eval()  # 12 blocks, the official keys: a stand-in for the released file
    os.makedirs(hub)
    torch.save(source.state_dict(), hub / "dino_deitsmall16_pretrain.pth")
    model = torch.hub.load(ROOT, "dino_vits16", source="local").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (model(x) - source(x)).abs().max() < 1e-4
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 150, 3), dtype=np.uint8)).save(image)
    assert visualize_attention.main(["--pretrained", "dino_vits16", "--image", str(image), "--image_size", "96",
                                     "--output_dir", str(tmp_path / "attn")]) == 0
    assert "mask-head5.png" in os.listdir(tmp_path / "attn")
