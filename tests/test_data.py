"""The data: the embedded shapes (deterministic, disjoint splits, masks on the object, balanced classes, a cache that
heals) and image folders (odd image modes, bad files skipped with a warning, one-line errors for bad paths)."""
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval_knn
import variants  # lab/variants.py: the lab's datasets, tested here with the core's


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Every test gets its own cache: the tests never read or write ~/.cache/dino_shapes."""
    monkeypatch.setenv("DINO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def save(path, img):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path)
    return path


def rgb_image(seed=0, size=(20, 16)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# --- the embedded dataset --------------------------------------------------------------------------------------
def test_same_seed_gives_same_pixels():
    a, ma, la = data.generate(20, seed=3, split="train", variant="shapes")
    b, mb, lb = data.generate(20, seed=3, split="train", variant="shapes")
    assert np.array_equal(a, b) and np.array_equal(ma, mb) and np.array_equal(la, lb)
    assert not np.array_equal(a, data.generate(20, seed=4, split="train", variant="shapes")[0])


def test_an_image_does_not_depend_on_the_dataset_size():
    ten, thirty = (data.generate(n, split="val", variant="shapes")[0] for n in (10, 30))
    assert np.array_equal(ten, thirty[:10])


def test_train_and_val_share_no_image():
    train, val = (data.generate(100, split=split, variant="shapes")[0] for split in ("train", "val"))
    assert not {im.tobytes() for im in train} & {im.tobytes() for im in val}
    assert np.abs(train.astype(int) - val.astype(int)).mean() > 20  # not near-copies either


@pytest.mark.parametrize("variant", list(data.VARIANTS))
def test_classes_are_balanced(variant):
    ds = data.ShapesDataset("train", n=50, variant=variant)
    assert len(ds.classes) == 10 and len(ds) == len(ds.targets) == 50
    assert np.bincount(ds.targets, minlength=10).tolist() == [5] * 10


@pytest.mark.parametrize("variant", list(data.VARIANTS))
def test_mask_is_exactly_the_drawn_object_on_a_plain_background(variant):
    # plain=True draws the same object white on black: the mask must be the pixels at least half covered by it
    for label in range(10):
        img, mask = data.render_image(np.random.default_rng(label), label, variant, plain=True)
        assert np.array_equal(mask, img[..., 0] >= 128)


@pytest.mark.parametrize("variant", list(data.VARIANTS))
def test_every_class_is_a_different_shape(variant):
    masks = [data.render_image(np.random.default_rng(0), label, variant, plain=True)[1] for label in range(10)]
    for i in range(10):  # same pose for all classes: any two silhouettes must clearly differ
        for j in range(i):
            iou = (masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()
            assert iou < 0.85, (i, j, iou)


def test_masks_sit_on_a_large_salient_object():
    ds = data.ShapesDataset("val", n=50, variant="shapes")
    for i in range(len(ds)):
        img, mask = np.asarray(ds.image(i), np.float32), ds.mask(i)
        assert mask.shape == (64, 64) and mask.dtype == bool
        assert 0.02 < mask.mean() < 0.5  # the object spans 35-75% of the side
        rows, cols = np.nonzero(mask)
        assert max(np.ptp(rows), np.ptp(cols)) + 1 >= 0.25 * 64  # smallest: an upright triangle, 1.5 r = 26%
        # the object's colour differs from its surroundings (a one-pixel ring just outside the mask)
        ring = np.zeros_like(mask)
        ring[1:-1, 1:-1] = mask[:-2, 1:-1] | mask[2:, 1:-1] | mask[1:-1, :-2] | mask[1:-1, 2:]
        ring &= ~mask
        assert np.linalg.norm(img[mask].mean(0) - img[ring].mean(0)) > 20


def test_dataset_items_are_pil_images_and_int_labels_and_transform_is_applied():
    ds = data.ShapesDataset("val", n=20, variant="shapes", transform=np.asarray)
    x, y = ds[3]
    assert x.shape == (64, 64, 3) and isinstance(y, int) and y == 3
    assert ds.image(3).mode == "RGB"


def test_second_load_reads_the_cache(monkeypatch):
    first = data.ShapesDataset("train", n=20, variant="shapes")
    monkeypatch.setattr(data, "generate", lambda *a, **k: pytest.fail("regenerated despite a valid cache"))
    assert np.array_equal(data.ShapesDataset("train", n=20, variant="shapes").images, first.images)


def test_corrupt_cache_is_regenerated(cache_dir):
    first = data.ShapesDataset("val", n=20, variant="shapes")
    path = data.cache_path("val", 20, variant="shapes")
    assert os.path.exists(path)
    with open(path, "r+b") as f:  # clobber the middle of the file
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\0garbage" * 100)
    assert np.array_equal(data.ShapesDataset("val", n=20, variant="shapes").images, first.images)
    with open(path, "wb") as f:  # a partial (truncated) file
        f.write(b"PK\x03\x04")
    assert np.array_equal(data.ShapesDataset("val", n=20, variant="shapes").images, first.images)
    assert not [f for f in os.listdir(cache_dir) if f.endswith(".tmp")]


# --- image folders ----------------------------------------------------------------------------------------------
def test_folder_dataset_round_trips_images_labels_and_masks(tmp_path):
    root = data.make_folder_dataset(str(tmp_path / "f"), n_train=20, n_val=10, seed=1, variant="scatter2")
    train = data.build_dataset(root, "train")
    val = data.build_dataset(root, "val", masks_root=os.path.join(root, "masks", "val"))
    assert len(train) == 20 and len(val) == 10 and train.classes == val.classes == sorted(variants.SHAPES2)
    images, masks, labels = data.generate(10, seed=1, split="val", variant="scatter2")
    for i in range(len(val)):
        img, label = val[i]
        j = int(os.path.basename(val.samples[i][0])[:-4])  # files are named by generation index
        assert img.mode == "RGB" and val.classes[label] == list(variants.SHAPES2)[labels[j]]
        assert np.array_equal(np.asarray(img), images[j]) and np.array_equal(val.mask(i), masks[j])
    assert train.mask(0) is None  # no masks_root, no mask
    # a masks_root that holds val/ is understood too
    assert np.array_equal(data.build_dataset(root, "val", masks_root=os.path.join(root, "masks")).mask(0), val.mask(0))


def test_odd_image_modes_load_as_rgb(tmp_path):
    root = tmp_path / "odd" / "train"
    rgb = rgb_image()
    save(str(root / "a" / "rgb.JPG"), rgb)  # upper-case extension
    save(str(root / "a" / "gray.png"), rgb.convert("L"))
    save(str(root / "a" / "rgba.png"), rgb.convert("RGBA"))
    save(str(root / "a" / "palette.gif"), rgb.convert("P"))
    save(str(root / "b" / "deep" / "cmyk.tiff"), rgb.convert("CMYK"))  # nested inside a class folder
    save(str(root / "b" / "sixteen.png"), Image.fromarray(np.full((16, 20), 65535, np.uint16)))  # I;16, white
    save(str(root / "b" / "bw.bmp"), rgb.convert("1"))
    save(str(root / "b" / "tiny.webp"), rgb_image(size=(3, 2)))  # smaller than any crop: kept, not filtered
    (root / "b" / "notes.txt").write_text("not an image")
    ds = data.build_dataset(str(tmp_path / "odd"), "train")
    assert ds.classes == ["a", "b"] and len(ds) == 8 and ds.targets == [0, 0, 0, 0, 1, 1, 1, 1]
    for i in range(len(ds)):
        img, label = ds[i]
        assert img.mode == "RGB" and label == ds.targets[i]
    sixteen = ds.samples.index((str(root / "b" / "sixteen.png"), 1))
    assert np.asarray(ds[sixteen][0]).min() == 255  # 16-bit white is 8-bit white, not clipped garbage
    assert ds.image(ds.samples.index((str(root / "b" / "tiny.webp"), 1))).size == (3, 2)


def test_unreadable_and_truncated_files_are_skipped_with_a_warning(tmp_path):
    root = tmp_path / "bad"
    for k in range(4):
        save(str(root / "a" / f"{k}.png"), rgb_image(k))
    (root / "a" / "1_corrupt.jpg").write_bytes(b"this is not a jpeg")
    whole = (root / "a" / "2.png").read_bytes()
    (root / "a" / "2_truncated.png").write_bytes(whole[: len(whole) // 2])
    ds = data.build_dataset(str(root), "train", transform=np.asarray)
    assert len(ds) == 6  # listed, not opened, at construction
    with pytest.warns(data.UnreadableImageWarning) as caught:
        # training-style pass: every index yields a readable image, through a DataLoader
        loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=list)
        items = [x for batch in loader for x in batch]
    assert len(items) == 6 and all(x.shape == (16, 20, 3) for x, _ in items)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and "1_corrupt.jpg" in messages[0] and "2_truncated.png" in messages[1]
    assert messages[1].startswith("skipped 2 unreadable images so far")
    with warnings.catch_warnings():  # a second epoch does not re-open (or re-warn about) known bad files
        warnings.simplefilter("error")
        assert len([ds[i] for i in range(len(ds))]) == 6


def test_a_folder_of_unreadable_files_raises_dataerror(tmp_path):
    for k in range(data.MAX_CONSECUTIVE_FAILURES + 2):
        (tmp_path / "junk" / "a").mkdir(parents=True, exist_ok=True)
        (tmp_path / "junk" / "a" / f"{k:03d}.png").write_bytes(b"junk")
    ds = data.build_dataset(str(tmp_path / "junk"), "train")
    with warnings.catch_warnings(), pytest.raises(data.DataError, match="consecutive unreadable"):
        warnings.simplefilter("ignore")
        ds[0]


def test_train_split_falls_back_to_the_root_and_val_is_required(tmp_path):
    save(str(tmp_path / "flat" / "cat" / "x.png"), rgb_image())
    assert len(data.build_dataset(str(tmp_path / "flat"), "train")) == 1
    with pytest.raises(data.DataError, match="no val/ folder"):
        data.build_dataset(str(tmp_path / "flat"), "val")
    # --data /path/imagenet/train: val is the sibling folder
    save(str(tmp_path / "inet" / "train" / "cat" / "x.png"), rgb_image())
    save(str(tmp_path / "inet" / "val" / "cat" / "y.png"), rgb_image())
    assert data.build_dataset(str(tmp_path / "inet" / "train"), "val").samples[0][0].endswith("y.png")


@pytest.mark.parametrize("case, expected", [
    ("missing", "data folder not found"),
    ("empty", "no images found"),
    ("loose", "directly in it"),
    ("no_val", "no val/ folder"),
    ("name", "unknown data 'imagenette'"),
    ("split", "unknown split"),
])
def test_bad_data_raises_a_one_line_dataerror(tmp_path, case, expected):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    save(str(tmp_path / "loose" / "x.jpg"), rgb_image())
    save(str(tmp_path / "trainonly" / "train" / "cat" / "x.png"), rgb_image())
    data_arg, split = {"missing": (str(tmp_path / "nope"), "train"), "empty": (str(tmp_path / "empty"), "train"),
                       "loose": (str(tmp_path / "loose"), "train"), "no_val": (str(tmp_path / "trainonly"), "val"),
                       "name": ("imagenette", "train"), "split": ("shapes", "test")}[case]
    with pytest.raises(data.DataError) as e:
        data.build_dataset(data_arg, split)
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)


def test_cli_writes_a_folder(tmp_path):
    data.main(["--make_folder", str(tmp_path / "folder"), "--n_train", "10", "--n_val", "10"])
    assert len(data.build_dataset(str(tmp_path / "folder"), "val")) == 10
    assert len(data.build_dataset(str(tmp_path / "folder"), "train")) == 10


@pytest.mark.parametrize("labels", [[i % 10 for i in range(5000)],  # the embedded data: interleaved labels
                                    sorted(i % 7 for i in range(9000))])  # an image folder: sorted by class
@pytest.mark.parametrize("n", [200, 2500])
def test_class_balanced_indices_keep_every_class_share(labels, n):
    # what the online k-NN monitor and the Jaccard subsample use; a plain stride once kept only even classes
    indices = data.class_balanced_indices(labels, n)
    assert len(set(indices)) == len(indices) == n and indices == sorted(indices)
    shares = np.bincount(np.asarray(labels)[indices]) / n
    expected = np.bincount(labels) / len(labels)
    np.testing.assert_allclose(shares, expected, atol=2 / n)


def test_labels_per_class_is_a_fixed_seeded_choice_of_n_images_of_every_class():
    ds = data.ShapesDataset("train", n=50)
    few = eval_knn.labels_per_class(ds, 3)
    assert np.bincount([ds.targets[i] for i in few.indices], minlength=10).tolist() == [3] * 10
    assert few.indices == eval_knn.labels_per_class(ds, 3).indices != eval_knn.labels_per_class(ds, 3, seed=1).indices
    for bad in (0, 6):
        with pytest.raises(data.DataError, match="--labels_per_class"):
            eval_knn.labels_per_class(ds, bad)


def _regions(mask):
    """Label map (H, W) of the 4-connected foreground regions of a bool mask (0: background, 1..n), and n."""
    labels, count = np.zeros(mask.shape, int), 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        count, stack = count + 1, [start]
        while stack:
            y, x = stack.pop()
            if 0 <= y < mask.shape[0] and 0 <= x < mask.shape[1] and mask[y, x] and not labels[y, x]:
                labels[y, x] = count
                stack += [(y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)]
    return labels, count


@pytest.mark.parametrize("variant", ["scatter", "scatter2"])
def test_scatter_draws_several_small_separate_copies(variant):
    _, masks, labels = data.generate(50, split="val", variant=variant)
    assert all(0.03 < m.mean() < 0.3 for m in masks)  # 4-8 copies, each spanning 14-26% of the side
    if variant == "scatter":  # count the copies of the solid shapes (a star's tips may fall apart at 64 px)
        solid = [m for m, y in zip(masks, labels) if list(data.SHAPES)[y] in ("circle", "square", "heart")]
        counts = [_regions(m)[1] for m in solid]
        assert all(2 <= c <= 8 for c in counts) and np.mean(counts) > 4, counts  # copies never touch; a few may not fit


def test_scatter_images_share_nothing_but_the_shape():
    # A level drawn once per image would be in every crop of it, so DINO could match two views by it instead of by
    # the shape (the teacher of an earlier version told the background level of an image better than its class):
    # the background is one level for all images, and each copy has its own grey.
    images, masks, _ = data.generate(40, split="val", variant="scatter")
    grey = images.astype(np.float32).mean(-1)  # (n, H, W)
    background = [g[~m].mean() for g, m in zip(grey, masks)]
    assert np.ptp(background) < 6, background  # pixel noise and antialiased edges only
    spread = []  # per image: the range of the copies' grey levels
    for g, m in zip(grey, masks):
        inner = m & np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1)  # no edge pixels
        regions, n = _regions(m)
        levels = [g[inner & (regions == k)].mean() for k in range(1, n + 1) if (inner & (regions == k)).any()]
        spread.append(np.ptp(levels))
    assert np.median(spread) > 20, spread  # levels uniform in 170-255, one per copy
