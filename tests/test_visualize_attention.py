"""Attention maps and their masks (Sec. 4.2.2, Fig. 3-4): the 60%-mass rule by hand, Jaccard, the command line."""
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import augment
import data
import visualize_attention as va
import vit


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return vit.vit_tiny(patch_size=8, depth=1, img_size=32)  # 3 heads, 4x4 patches at 32 px


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A fake train.py checkpoint: teacher/student `backbone.*` + `head.*`, args a plain dict."""
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pth"
    sd = {f"backbone.{k}": v for k, v in tiny_vit().state_dict().items()}
    sd["head.last_layer.weight"] = torch.zeros(8, 4)
    args = {"arch": "vit_tiny", "patch_size": 8, "depth": 1, "global_size": 32, "data": "shapes"}
    torch.save({"teacher": sd, "student": sd, "epoch": 1, "args": args}, path)
    return str(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """ROOT/{train,val}/<class>/*.png and ROOT/masks/val/<class>/*.png, 32 px."""
    return data.make_folder_dataset(str(tmp_path_factory.mktemp("folder")), 20, 10, size=32, variant="shapes")


# --- attention maps ------------------------------------------------------------------------------------------

def test_attention_rows_sum_to_one_and_the_cls_maps_cover_the_patch_grid():
    model = tiny_vit().eval()
    x = torch.randint(0, 256, (2, 3, 32, 48), dtype=torch.uint8)  # not square: a 4 x 6 patch grid
    with torch.no_grad():
        attn = model.get_last_selfattention(augment.normalize(x))
    assert attn.shape == (2, 3, 1 + 24, 1 + 24)  # (B, heads, 1+N, 1+N)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 25))  # every query's weights sum to 1
    maps = va.cls_attention(model, x)
    assert maps.shape == (2, 3, 4, 6)  # (B, heads, h/P, w/P)
    torch.testing.assert_close(maps.sum((-2, -1)), 1 - attn[:, :, 0, 0])  # [CLS] row minus [CLS]-to-itself
    torch.testing.assert_close(maps[0, 1].flatten(), attn[0, 1, 0, 1:])  # patches in raster order


def test_upsampling_repeats_each_patch_over_its_pixels_like_nearest_interpolation():
    grid = torch.rand(3, 4, 6)
    pixels = va.to_pixels(grid, 8)
    assert pixels.shape == (3, 32, 48)
    torch.testing.assert_close(pixels, F.interpolate(grid[None], scale_factor=8, mode="nearest")[0])


# --- the 60%-mass masks --------------------------------------------------------------------------------------

def test_mass_threshold_keeps_the_top_patches_holding_60_percent():
    # increasing: 0.1, 0.15, 0.25, 0.5 -> cumulative 0.1, 0.25, 0.5, 1.0; kept where > 1 - 0.6 = 0.4
    attn = torch.tensor([[0.5, 0.25], [0.15, 0.1]])
    assert va.mass_mask(attn, 0.6).tolist() == [[True, True], [False, False]]  # 0.75 of the mass kept
    assert va.mass_mask(3 * attn, 0.6).tolist() == [[True, True], [False, False]]  # mass is relative to the total
    assert va.mass_mask(attn, 0.5).tolist() == [[True, False], [False, False]]  # 0.5 alone is enough
    assert va.mass_mask(attn, 1.0).tolist() == [[True, True], [True, True]]


def test_mass_threshold_with_a_tie_keeps_one_of_the_equal_patches():
    # 0.5 alone holds less than 0.6; 0.5 + 0.2 = 0.7 is enough, so exactly one of the two 0.2 patches is kept
    keep = va.mass_mask(torch.tensor([[0.5, 0.2, 0.2, 0.1]]), 0.6)[0]
    assert keep[0] and not keep[3] and int(keep[1]) + int(keep[2]) == 1


def test_mass_threshold_keeps_the_smallest_set_of_top_patches_with_enough_mass():
    attn = torch.rand(6, 5, 7, dtype=torch.float64) ** 4  # peaky, like trained attention
    attn /= attn.sum((-2, -1), keepdim=True)
    for t in (0.3, 0.6, 0.9):
        keep = va.mass_mask(attn, t)
        for a, k in zip(attn, keep):
            assert a[k].sum() >= t  # enough mass ...
            assert a[k].sum() - a[k].min() < t  # ... and not one patch more than needed
            assert a[k].min() >= a[~k].max()  # the kept patches are the top ones


def test_uniform_attention_keeps_that_fraction_of_the_patches():
    # an untrained ViT attends almost uniformly: its masks cover ~60% of the image whatever is in it
    uniform = torch.full((8, 8), 1 / 64)  # powers of two: the cumulative sums are exact
    assert va.mass_mask(uniform, 0.5).sum() == 32
    assert va.mass_mask(uniform, 0.75).sum() == 48


# --- Jaccard -------------------------------------------------------------------------------------------------

def test_jaccard_is_one_for_identical_masks_zero_for_disjoint_ones():
    a = torch.zeros(4, 4, dtype=torch.bool)
    a[:2] = True
    assert va.jaccard(a, a) == 1
    assert va.jaccard(a, ~a) == 0
    b = torch.zeros(4, 4, dtype=torch.bool)
    b[1:3] = True
    assert va.jaccard(a, b) == pytest.approx(1 / 3)  # 4 shared pixels of 12
    assert va.jaccard(torch.stack([a, ~a, b]), a).tolist() == pytest.approx([1, 0, 1 / 3])  # one per head


def test_random_init_model_has_the_checkpoint_shape_but_new_weights():
    model = tiny_vit()
    fresh, again = va.random_like(model, "vit_tiny", seed=1), va.random_like(model, "vit_tiny", seed=1)
    own = model.state_dict()
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in own.items()}
    assert not torch.equal(fresh.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    assert torch.equal(fresh.blocks[0].attn.qkv.weight, again.blocks[0].attn.qkv.weight)  # seeded


# --- command line --------------------------------------------------------------------------------------------

def test_cli_writes_the_pictures_for_a_tiny_checkpoint(checkpoint, tmp_path, capsys):
    image = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 70, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "attn"
    assert va.main([checkpoint, "--image", str(image), "--output_dir", str(out)]) == 0
    names = {"img.png", "attn-overlay.png"} | {f"{k}-head{i}.png" for k in ("attn", "mask") for i in range(3)}
    assert set(os.listdir(out)) == names
    for name in names:  # short side 37 -> 32 (the training size), long side 70 -> 60, cropped to 56 = 7 patches
        with Image.open(out / name) as im:
            assert im.size == (56, 32) and im.mode == "RGB"
    assert "wrote 8 pictures" in capsys.readouterr().out
    assert va.main([checkpoint, "--image", str(image), "--output_dir", str(out), "--image_size", "40"]) == 0
    with Image.open(out / "img.png") as im:
        assert im.size == (72, 40)  # 40 x 75 -> 72 x 40


def test_cli_jaccard_on_a_folder_prints_one_jaccard_line(checkpoint, folder, capsys):
    for extra in ([], ["--random_init", "--max_images", "4"]):
        assert va.main([checkpoint, "--jaccard", "--data", folder, "--masks", os.path.join(folder, "masks"),
                        *extra]) == 0
        captured = capsys.readouterr()
        lines = captured.out.strip().splitlines()
        assert len(lines) == 1 and re.fullmatch(r"Jaccard \d+\.\d\d", lines[0]), captured.out
        assert 0 < float(lines[0].split()[1]) <= 100
        assert "union of heads" in captured.err
    assert "4 val images" in captured.err


def test_jaccard_on_the_embedded_data_needs_no_masks(checkpoint, capsys):
    assert va.main([checkpoint, "--jaccard", "--data", "shapes", "--max_images", "3", "--image_size", "64"]) == 0
    assert re.fullmatch(r"Jaccard \d+\.\d\d\n", capsys.readouterr().out)


@pytest.mark.parametrize("case", ["missing image", "missing checkpoint", "folder without masks", "bad threshold"])
def test_errors_are_one_line_and_exit_2(case, checkpoint, folder, tmp_path, capsys):
    argv = {"missing image": [checkpoint, "--image", str(tmp_path / "nope.jpg")],
            "missing checkpoint": [str(tmp_path / "nope.pth"), "--image", str(tmp_path / "nope.jpg")],
            "folder without masks": [checkpoint, "--jaccard", "--data", os.path.join(folder, "train"),
                                     "--masks", str(tmp_path / "nomasks")],
            "bad threshold": [checkpoint, "--image", "x.png", "--threshold", "60"]}[case]
    assert va.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and captured.err.startswith("error: ")
    assert "Traceback" not in captured.err
