"""lab/variants.py: the lab's embedded datasets, known to data.py once it is imported; `silhouettes`, the control on
which raw pixels already find the class, where they do not on `scatter`."""
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

import data
import eval_knn
import variants  # noqa: F401  (puts `scatter2`, `shapes` and `silhouettes` into data.VARIANTS)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _raw_pixel_knn(variant):
    """20-NN top-1 (%) of 200 val images among 500 train images, cosine similarity of the raw pixels, each image
    centred on its own mean (so that a brighter background does not count as a difference)."""
    feats = []
    for split, n in (("train", 500), ("val", 200)):
        images, _, labels = data.generate(n, split=split, variant=variant)
        x = torch.tensor(images, dtype=torch.float32).flatten(1)
        feats += [F.normalize(x - x.mean(1, keepdim=True), dim=1), torch.tensor(labels)]
    return eval_knn.knn_classifier(*feats, k=20, T=0.07, num_classes=10)[0]


def test_scatter_is_not_solved_by_raw_pixels_but_silhouettes_are():
    # the point of `--data scatter`: where the copies lie is noise, so pixels alone do not find the class
    assert _raw_pixel_knn("scatter") < 35 < 60 < _raw_pixel_knn("silhouettes")


def test_data_py_run_through_the_lab_writes_a_silhouettes_folder(tmp_path):
    proc = subprocess.run([sys.executable, "lab/variants.py", "data.py", "--make_folder", str(tmp_path), "--variant",
                           "silhouettes", "--n_train", "10", "--n_val", "10"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert len(os.listdir(tmp_path / "train")) == 10 and "silhouettes" not in subprocess.run(
        [sys.executable, "data.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=300).stdout
