"""plot_log.py: curves of log.txt (loss, entropy / log K, KL, online k-NN) as a PNG."""
import json
import math

from PIL import Image

import plot_log


def write_log(path, n=4, knn=True):
    with open(path, "w") as f:
        for e in range(n):
            log = {"epoch": e, "loss": 6 - e, "teacher_entropy": math.log(1024) * (1 - e / 10), "kl": 0.5 / (e + 1)}
            if knn:
                log["knn_top1"], log["knn_top1_student"] = 10 + e, 9 + e
            f.write(json.dumps(log) + "\n")


def test_entropy_is_shown_as_a_fraction_of_log_k(tmp_path):
    write_log(tmp_path / "log.txt")
    logs = plot_log.read_log(tmp_path / "log.txt", out_dim=1024)
    assert abs(logs[0]["teacher_entropy"] - 1.0) < 1e-9 and abs(logs[-1]["teacher_entropy"] - 0.7) < 1e-9


def test_several_logs_make_one_png_even_without_knn(tmp_path):
    for name, knn in (("a", True), ("b", False)):
        (tmp_path / name).mkdir()
        write_log(tmp_path / name / "log.txt", knn=knn)
    out = tmp_path / "docs" / "curves.png"
    assert plot_log.main([str(tmp_path / "a" / "log.txt"), str(tmp_path / "b" / "log.txt"), "--out", str(out),
                          "--out_dim", "1024"]) == 0
    assert Image.open(out).size == (900, 560)


def test_a_missing_log_is_one_error_line(tmp_path, capsys):
    assert plot_log.main([str(tmp_path / "nope" / "log.txt")]) == 2
    assert capsys.readouterr().err.startswith("error: log not found")


def test_the_knn_panel_draws_the_student_beside_the_teacher(tmp_path):
    (tmp_path / "a").mkdir()
    write_log(tmp_path / "a" / "log.txt")
    logs = plot_log.read_log(tmp_path / "a" / "log.txt")
    with_student = plot_log.plot([("a", logs)], tmp_path / "both.png")
    for log in logs:
        del log["knn_top1_student"]
    teacher_only = plot_log.plot([("a", logs)], tmp_path / "teacher.png")
    right, bottom = 900, 560  # the k-NN panel is the bottom-right one; the others are drawn the same
    crop = lambda im: im.crop((right // 2, bottom // 2, right, bottom - 30)).tobytes()
    assert crop(with_student) != crop(teacher_only)
    left_half = lambda im: im.crop((0, 0, right // 2, bottom)).tobytes()
    assert left_half(with_student) == left_half(teacher_only)
