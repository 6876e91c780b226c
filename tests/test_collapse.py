"""The collapse study of the paper (Sec. 5.3 "Avoiding collapse", Fig. 7; Table 6 "student copy") at toy scale.

Exercises: run `python -m pytest tests/test_collapse.py -v`, then
- remove the centring in loss.py (or pass centering=False): the "in between" test fails, entropy goes to 0;
- set the teacher temperature to the student's: entropy climbs to log K (uniform);
- train with --momentum_teacher 0: the teacher is the student and the features stop carrying information.
"""
import json
import math
import os
import subprocess
import sys

import pytest

import data
import train
import variants  # noqa: F401  (lab/variants.py: the lab's datasets; the tiny runs here draw from "shapes")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return data.make_folder_dataset(str(tmp_path_factory.mktemp("imgs")), n_train=32, n_val=10, size=32,
                                    variant="shapes")


def final_entropy(folder, out, *flags):
    """Train a tiny ViT for 40 steps (8 epochs of 5 steps) and return the last epoch's teacher entropy / log K."""
    train.main(train.get_args([
        "--data", folder, "--arch", "vit_tiny", "--patch", "8", "--depth", "1", "--out_dim", "64",
        "--global_size", "32", "--local_size", "16", "--local_crops_number", "2", "--batch_size", "6",
        "--epochs", "8", "--warmup_epochs", "1", "--lr", "0.005", "--momentum_teacher", "0.9", *flags,
        "--warmup_teacher_temp_epochs", "0", "--teacher_temp", "0.04", "--freeze_last_layer", "0",
        "--num_workers", "0", "--knn_every", "0", "--output_dir", str(out)]))
    logs = [json.loads(line) for line in open(out / "log.txt")]
    return logs[-1]["teacher_entropy"] / math.log(64)


def test_sharpening_alone_collapses_to_one_dimension(folder, tmp_path):
    assert final_entropy(folder, tmp_path, "--no_centering") < 0.15


def test_centering_alone_collapses_to_uniform(folder, tmp_path):
    assert final_entropy(folder, tmp_path, "--no_sharpening") > 0.9


def test_centering_and_sharpening_together_stay_in_between(folder, tmp_path):
    assert 0.15 < final_entropy(folder, tmp_path) < 0.9


def test_a_teacher_that_is_a_plain_copy_of_the_student_collapses(folder, tmp_path):
    assert final_entropy(folder, tmp_path, "--momentum_teacher", "0") > 0.9


def test_stop_on_collapse_ends_a_run_whose_teacher_stays_uniform_and_says_what_to_try(folder, tmp_path):
    args = ["--data", folder, "--arch", "vit_tiny", "--patch", "8", "--depth", "1", "--out_dim", "64",
            "--global_size", "32", "--local_size", "16", "--local_crops_number", "2", "--batch_size", "6",
            "--epochs", "6", "--lr", "0.005", "--momentum_teacher", "0.9", "--no_sharpening", "--knn_every", "0",
            "--num_workers", "0", "--stop_on_collapse", "true", "--output_dir", str(tmp_path)]
    out = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 3, out.stderr[-500:]
    assert "collapsed (uniform" in out.stderr and "--teacher_temp" in out.stderr
    logs = [json.loads(line) for line in open(tmp_path / "log.txt")]
    assert 2 <= len(logs) < 6 and logs[-1]["teacher_entropy"] > 0.98 * math.log(64)
    assert os.path.isfile(tmp_path / "checkpoint.pth")  # kept: the run can be inspected or resumed


def test_the_collapse_guard_is_on_for_the_cpu_preset_and_off_for_the_ablations():
    assert train.get_args([]).stop_on_collapse is True
    assert train.get_args(["--no_sharpening"]).stop_on_collapse is False
    assert train.get_args(["--no_centering", "--stop_on_collapse", "true"]).stop_on_collapse is True
    assert train.get_args(["--preset", "paper"]).stop_on_collapse is False
