"""lab/plot_samples.py: the README's pictures of the data and of the multi-crop views."""
from PIL import Image

import data
import plot_samples


def test_cli_writes_the_sample_grid_the_views_and_an_example(tmp_path, monkeypatch):
    monkeypatch.setenv("DINO_CACHE", str(tmp_path / "cache"))
    data.main(["--make_folder", str(tmp_path / "folder"), "--n_train", "10", "--n_val", "10"])
    out = tmp_path / "docs" / "samples.png"
    plot_samples.main(["--out", str(out), "--n", "4", "--data", str(tmp_path / "folder")])
    assert Image.open(out).size[0] > 4 * 64
    assert (out.parent / "multicrop.png").exists() and Image.open(out.parent / "example.png").size == (64, 64)
