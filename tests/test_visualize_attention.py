"""Attention maps and their masks (Sec. 4.2.2, Fig. 3-4): the 60%-mass rule by hand, Jaccard, the command line."""
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

import augment
import data
import eval_knn
import eval_linear
import variants  # noqa: F401  (lab/variants.py: the lab's datasets; the tiny runs here draw from "shapes")
import visualize_attention as va
import vit


# --- the official code, transcribed (facebookresearch/dino visualize_attention.py; issue #54 for the Jaccard) ------

def official_masks(model, img, image_size, patch_size, threshold=0.6):
    """The image handling and the thresholded maps of the official script: th_attn (heads, h, w)."""
    transform = T.Compose([T.Resize(image_size), T.ToTensor(),
                           T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    img = transform(img)
    w, h = img.shape[1] - img.shape[1] % patch_size, img.shape[2] - img.shape[2] % patch_size
    img = img[:, :w, :h].unsqueeze(0)
    w_featmap, h_featmap = img.shape[-2] // patch_size, img.shape[-1] // patch_size
    attentions = model.get_last_selfattention(img)
    nh = attentions.shape[1]
    attentions = attentions[0, :, 0, 1:].reshape(nh, -1)
    val, idx = torch.sort(attentions)
    val /= torch.sum(val, dim=1, keepdim=True)
    cumval = torch.cumsum(val, dim=1)
    th_attn = cumval > (1 - threshold)
    idx2 = torch.argsort(idx)
    for head in range(nh):
        th_attn[head] = th_attn[head][idx2[head]]
    th_attn = th_attn.reshape(nh, w_featmap, h_featmap).float()
    return F.interpolate(th_attn.unsqueeze(0), scale_factor=patch_size, mode="nearest")[0]


def authors_jaccard(th_attn, mask, objects):
    """The authors' per-image Jaccard (issue #54), void (255) pixels taken out of the heads' masks first."""
    th_attn = th_attn * (mask != 255)
    jac = 0
    for o in objects:
        masko = mask == o
        intersection = masko * th_attn
        intersection = torch.sum(torch.sum(intersection, dim=-1), dim=-1)
        union = (masko + th_attn) > 0
        union = torch.sum(torch.sum(union, dim=-1), dim=-1)
        jaco = intersection / union
        jac += max(jaco)
    return jac / len(objects)


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


def test_random_init_model_has_the_checkpoint_shape_but_new_weights(checkpoint):
    args = va.get_args_parser().parse_args([checkpoint, "--random_init", "--seed", "1"])
    fresh, again = (eval_knn.frozen_backbone(args, torch.device("cpu"), seed=args.seed)[0] for _ in range(2))
    model = tiny_vit()
    own = model.state_dict()
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in own.items()}
    assert not torch.equal(fresh.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    assert torch.equal(fresh.blocks[0].attn.qkv.weight, again.blocks[0].attn.qkv.weight)  # seeded


def test_jaccard_per_object_with_void_ignored_is_the_authors_protocol():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 12, 16, generator=g) < 0.4  # 3 heads
    labels = torch.zeros(12, 16, dtype=torch.long)
    labels[2:6, 3:9], labels[7:11, 8:14] = 1, 2  # two objects ...
    labels[1, 2:10], labels[6, 7:15] = 255, 255  # ... each with a void band
    ours = va.object_jaccard(masks, labels)
    assert ours == pytest.approx(authors_jaccard(masks.float(), labels, [1, 2]).item())
    assert ours != pytest.approx(authors_jaccard(masks.float(), torch.where(labels == 255, 0, labels), [1, 2]).item())


# --- the official image handling ----------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [[48, 40], [40]])
def test_masks_match_the_official_script(size):
    model = tiny_vit(1).eval()
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (37, 70, 3), dtype=np.uint8))
    x, attn, masks = va.attention_and_masks(model, img, size)
    with torch.no_grad():
        official = official_masks(model, img, size, 8)
    assert masks.shape[1:] == official.shape[1:] == ((48, 40) if size == [48, 40] else (40, 72))  # squashed, or not
    assert torch.equal(masks, official.bool())


def test_released_weights_are_shown_at_the_official_480_by_480(tmp_path):
    torch.manual_seed(0)
    torch.save(vit.vit_tiny(patch_size=16).state_dict(), tmp_path / "backbone.pth")  # a bare released file
    image = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(image)
    assert va.main([str(tmp_path / "backbone.pth"), "--arch", "vit_tiny", "--patch", "16", "--image", str(image),
                    "--output_dir", str(tmp_path / "attn")]) == 0
    with Image.open(tmp_path / "attn" / "mask-head0.png") as im:
        assert im.size == (480, 480)


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


def test_cli_jaccard_reads_object_ids_from_indexed_masks(checkpoint, tmp_path, capsys):
    """PASCAL VOC's SegmentationObject layout: palette PNGs, 0 background, 1..n objects, 255 void."""
    for name in ("a", "b"):
        os.makedirs(tmp_path / "voc" / "val" / "c", exist_ok=True)
        os.makedirs(tmp_path / "masks" / "c", exist_ok=True)
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(
            tmp_path / "voc" / "val" / "c" / f"{name}.jpg")
        ids = np.zeros((32, 40), np.uint8)
        ids[4:14, 4:20], ids[18:30, 20:36], ids[3, 4:20] = 1, 2, 255
        indexed = Image.fromarray(ids, "P")
        indexed.putpalette(np.repeat(np.arange(256, dtype=np.uint8), 3).tolist())  # a full palette, as VOC's
        indexed.save(tmp_path / "masks" / "c" / f"{name}.png")
    assert va.main([checkpoint, "--jaccard", "--data", str(tmp_path / "voc"), "--masks", str(tmp_path / "masks")]) == 0
    model = tiny_vit()
    x, _, masks = va.attention_and_masks(model, Image.open(tmp_path / "voc" / "val" / "c" / "a.jpg"), [32])
    ids = torch.from_numpy(np.array(Image.open(tmp_path / "masks" / "c" / "a.png"))[:, :40].astype(np.int64))
    expected = 100 * authors_jaccard(masks.float(), ids, [1, 2]).item()  # both images are the same
    assert capsys.readouterr().out == f"Jaccard {expected:.2f}\n"


def test_jaccard_on_the_embedded_data_needs_no_masks(checkpoint, capsys):
    assert va.main([checkpoint, "--jaccard", "--data", "shapes", "--max_images", "3", "--image_size", "64"]) == 0
    assert re.fullmatch(r"Jaccard \d+\.\d\d\n", capsys.readouterr().out)


def test_supervised_control_written_by_eval_linear_is_read_with_its_trained_weights(checkpoint, folder, tmp_path,
                                                                                      capsys):
    """Fig. 4's supervised row: `eval_linear.py CKPT --finetune --random_init` trains the same ViT with labels; its
    finetune.pth is what `visualize_attention.py --jaccard` then scores, trained weights and all."""
    assert eval_linear.main([checkpoint, "--finetune", "--random_init", "--epochs", "1", "--num_workers", "0",
                             "--n_last_blocks", "1", "--data", folder, "--output_dir", str(tmp_path)]) == 0
    tuned = torch.load(tmp_path / "finetune.pth", weights_only=True)
    model, saved = vit.from_checkpoint(str(tmp_path / "finetune.pth"))
    assert saved["arch"] == "vit_tiny" and saved["random_init"] and len(model.blocks) == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, tuned["model"][f"backbone.{k}"]), k
    assert not torch.equal(model.blocks[0].attn.qkv.weight, tiny_vit().blocks[0].attn.qkv.weight)  # trained
    capsys.readouterr()
    masks = ["--data", folder, "--masks", os.path.join(folder, "masks")]
    assert va.main([str(tmp_path / "finetune.pth"), "--jaccard", *masks]) == 0
    supervised = capsys.readouterr().out
    val = data.build_dataset(folder, "val", masks_root=os.path.join(folder, "masks"))
    best, _, _, _ = va.evaluate_jaccard(model, val, [32])
    assert supervised == f"Jaccard {best:.2f}\n"
    assert va.main([checkpoint, "--jaccard", "--random_init", *masks]) == 0
    assert capsys.readouterr().out != supervised  # not the untrained network


@pytest.mark.parametrize("case", ["missing image", "missing checkpoint", "folder without masks", "bad threshold", "three sizes"])
def test_errors_are_one_line_and_exit_2(case, checkpoint, folder, tmp_path, capsys):
    argv = {"missing image": [checkpoint, "--image", str(tmp_path / "nope.jpg")],
            "missing checkpoint": [str(tmp_path / "nope.pth"), "--image", str(tmp_path / "nope.jpg")],
            "folder without masks": [checkpoint, "--jaccard", "--data", os.path.join(folder, "train"),
                                     "--masks", str(tmp_path / "nomasks")],
            "bad threshold": [checkpoint, "--image", "x.png", "--threshold", "60"],
            "three sizes": [checkpoint, "--image", "x.png", "--image_size", "4", "4", "4"]}[case]
    assert va.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and captured.err.startswith("error: ")
    assert "Traceback" not in captured.err
