"""Retrieval (Sec. 4.2.1): average precision by hand, junk left out of the ranking, the command line on a tiny model."""
import re

import pytest
import torch

import data
import eval_retrieval as er
import vit


def test_average_precision_is_the_trapezoid_rule_of_the_oxford_code():
    # query 0 ranks its 2 relevant images 1st and 3rd; query 1 ranks its only relevant image 2nd
    similarity = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5], [0.1, 0.3, 0.9, 0.8, 0.2]])
    relevant = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 0]], dtype=torch.bool)
    ap0 = ((1 + 1) / 2 + (1 / 2 + 2 / 3) / 2) / 2  # j=0 at r=0: (1 + 1/1)/2; j=1 at r=2: (1/2 + 2/3)/2; over 2
    ap1 = (0 / 1 + 1 / 2) / 2  # j=0 at r=1: (0/1 + 1/2)/2
    assert er.mean_average_precision(similarity, relevant) == pytest.approx((ap0 + ap1) / 2)
    assert er.mean_average_precision(similarity[:1], relevant[:1]) == pytest.approx(0.7916666)


def test_a_perfect_ranking_scores_one_and_queries_without_answers_are_left_out():
    similarity = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.4]])
    relevant = torch.tensor([[1, 0, 1], [0, 0, 0]], dtype=torch.bool)
    assert er.mean_average_precision(similarity, relevant) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no query"):
        er.mean_average_precision(similarity[1:], relevant[1:])


def test_junk_images_are_taken_out_of_the_ranking():
    similarity = torch.tensor([[0.9, 0.8, 0.7]])
    relevant = torch.tensor([[0, 1, 0]], dtype=torch.bool)
    junk = torch.tensor([[1, 0, 0]], dtype=torch.bool)
    assert er.mean_average_precision(similarity, relevant) == pytest.approx(0.25)  # 2nd: (0/1 + 1/2) / 2
    assert er.mean_average_precision(similarity, relevant, junk) == pytest.approx(1.0)  # 1st once junk is out


def test_chunks_do_not_change_the_mean():
    g = torch.Generator().manual_seed(0)
    similarity, relevant = torch.rand(37, 50, generator=g), torch.rand(37, 50, generator=g) < 0.2
    relevant[:, 0] = True
    torch.testing.assert_close(er.mean_average_precision(similarity, relevant, chunk_size=5),
                               er.mean_average_precision(similarity, relevant))


def test_revisited_protocols_move_easy_images_between_relevant_and_junk():
    gnd = [{"easy": [0], "hard": [2], "junk": [3]}]
    medium, medium_junk = er.revisited_relevance(gnd, 5, "medium")
    hard, hard_junk = er.revisited_relevance(gnd, 5, "hard")
    assert medium[0].tolist() == [1, 0, 1, 0, 0] and medium_junk[0].tolist() == [0, 0, 0, 1, 0]
    assert hard[0].tolist() == [0, 0, 1, 0, 0] and hard_junk[0].tolist() == [1, 0, 0, 1, 0]


def test_cli_prints_the_map_for_retrieval_and_copy_detection(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DINO_CACHE", str(tmp_path / "cache"))
    folder = data.make_folder_dataset(str(tmp_path / "folder"), 10, 6, size=32)
    torch.manual_seed(0)
    model = vit.vit_tiny(patch_size=8, depth=1, img_size=32)
    sd = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    args = {"arch": "vit_tiny", "patch_size": 8, "depth": 1, "global_size": 32, "data": folder}
    torch.save({"teacher": sd, "student": sd, "args": args}, tmp_path / "checkpoint.pth")
    results = {}
    for mode in ("retrieval", "copydetection"):
        assert er.main([str(tmp_path / "checkpoint.pth"), "--mode", mode, "--num_workers", "0"]) == 0
        out = capsys.readouterr().out
        assert re.search(r"^mAP: \d+\.\d\d$", out, re.M), out
        results[mode] = float(out.split("mAP: ")[1])
    assert "6 strong copies of the val images, 6 originals + 10 train distractors" in out
    assert 0 < results["retrieval"] <= 100 and 0 < results["copydetection"] <= 100


@pytest.mark.parametrize("argv,message", [(["no_such_checkpoint.pth"], "not found"),
                                          (["--pretrained", "dino_vits32"], "unknown released model")])
def test_mistakes_are_one_line(argv, message, capsys):
    assert er.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
