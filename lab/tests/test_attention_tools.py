"""lab/attention_probe.py and lab/plot_attention.py: the probe's last block is visualize_attention.py's Jaccard; the
Fig. 4 sheet has a row per image and a column per network."""
import os

import pytest
import torch
from PIL import Image

import attention_probe
import data
import plot_attention
import variants  # noqa: F401  (lab/variants.py: the lab's datasets; the tiny runs here draw from "shapes")
import visualize_attention as va
import vit


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny checkpoint (ViT-tiny/8, one block, 32 px) trained on a folder with val masks."""
    root = tmp_path_factory.mktemp("probe")
    folder = data.make_folder_dataset(str(root / "folder"), 20, 10, size=32, variant="shapes")
    torch.manual_seed(1)
    sd = {f"backbone.{k}": v for k, v in vit.vit_tiny(patch_size=8, depth=1, img_size=32).state_dict().items()}
    args = {"arch": "vit_tiny", "patch_size": 8, "depth": 1, "global_size": 32, "data": folder}
    torch.save({"teacher": sd, "student": sd, "args": args}, root / "checkpoint.pth")
    return str(root / "checkpoint.pth"), folder


def test_the_probe_scores_the_last_block_as_visualize_attention_does(run, capsys):
    ckpt, folder = run
    attention_probe.main([ckpt])
    out = dict(line.rsplit(" Jaccard ", 1) for line in capsys.readouterr().out.splitlines() if " Jaccard " in line)
    out = {k.strip(): float(v) for k, v in out.items()}
    model, _ = vit.from_checkpoint(ckpt)
    best, _, _, _ = va.evaluate_jaccard(model.eval(), data.build_dataset(folder, "val",
                                                                         masks_root=os.path.join(folder, "masks")), [32])
    assert out["teacher block 1"] == pytest.approx(best, abs=0.01)
    assert out["foreground"] > out["uniform"]  # weighting patches by their object pixels beats no preference


def test_the_fig4_sheet_has_a_row_per_image_and_two_columns_per_network(run, tmp_path):
    ckpt, _ = run
    out = tmp_path / "attention.png"
    plot_attention.main([ckpt, ckpt, "--images", "0", "1", "--out", str(out)])
    w = 32 * plot_attention.SCALE + plot_attention.GAP
    assert Image.open(out).size == (7 * w - plot_attention.GAP, 14 + 2 * w - plot_attention.GAP)
