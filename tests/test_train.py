"""train.py: the EMA teacher, schedules, clipping, freezing, checkpoints, resume and DDP (Alg. 1, Sec. 3.2)."""
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data
import eval_knn
import train
import variants  # noqa: F401  (lab/variants.py: the lab's datasets; the tiny runs here draw from "shapes")
import vit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return data.make_folder_dataset(str(tmp_path_factory.mktemp("imgs")), n_train=32, n_val=20, size=32,
                                    variant="shapes")


def tiny_args(folder, out, *extra):
    return ["--data", folder, "--arch", "vit_tiny", "--patch", "8", "--depth", "1", "--out_dim", "32",
            "--global_size", "32", "--local_size", "16", "--local_crops_number", "2", "--batch_size", "8",
            "--epochs", "2", "--warmup_epochs", "1", "--num_workers", "0", "--knn_every", "0",
            "--output_dir", str(out), *extra]


def run_cli(args, timeout=300):
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def teacher_of(out, name="checkpoint.pth"):
    return torch.load(os.path.join(out, name), map_location="cpu", weights_only=False)["teacher"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_momentum_teacher_update_is_the_ema_formula():
    teacher, student = [torch.randn(3, 4), torch.randn(5)], [torch.randn(3, 4), torch.randn(5)]
    expected = [0.99 * t + 0.01 * s for t, s in zip(teacher, student)]
    train.update_teacher(teacher, student, 0.99)
    for t, e in zip(teacher, expected):
        torch.testing.assert_close(t, e)


def test_schedules_have_one_value_per_iteration_and_the_right_endpoints():
    lr = train.cosine_schedule(1.0, 0.01, epochs=10, niter_per_ep=5, warmup_epochs=2)
    assert len(lr) == 50 and lr[0] == 0.0 and lr[9] == pytest.approx(1.0)  # linear warm-up from 0
    assert np.all(np.diff(lr[10:]) <= 0) and lr[-1] == pytest.approx(0.01, abs=2e-3)  # cosine down to min
    momentum = train.cosine_schedule(0.996, 1.0, 10, 5)
    assert momentum[0] == 0.996 and momentum[-1] == pytest.approx(1.0, abs=1e-5) and np.all(np.diff(momentum) >= 0)
    assert len(train.cosine_schedule(1.0, 0.0, 1, 4, warmup_epochs=10)) == 4  # warm-up longer than the run


def test_gradient_clipping_is_per_parameter_as_in_the_official_code():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    grads = [torch.full_like(p, v) for p, v in zip(model.parameters(), [10.0, 0.01, 5.0, 0.1])]
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    train.clip_gradients(model, 1.0)
    for p, g in zip(model.parameters(), grads):
        expected = g * min(1.0, 1.0 / (g.norm().item() + 1e-6))  # each parameter on its own
        torch.testing.assert_close(p.grad, expected)


def test_weight_decay_applies_to_weights_cls_token_and_pos_embed_but_not_biases_or_norms():
    model = train.MultiCropWrapper(vit.vit_tiny(depth=1), torch.nn.Linear(192, 8))
    decay, no_decay = train.param_groups(model)
    decayed = {id(p) for p in decay["params"]}
    named = dict(model.named_parameters())
    assert id(named["backbone.cls_token"]) in decayed and id(named["backbone.pos_embed"]) in decayed
    assert id(named["backbone.blocks.0.attn.qkv.weight"]) in decayed
    assert id(named["backbone.blocks.0.attn.qkv.bias"]) not in decayed
    assert id(named["backbone.norm.weight"]) not in decayed
    assert no_decay["weight_decay"] == 0.0


def test_teacher_gets_no_gradients_and_sees_only_the_global_crops(folder, tmp_path, monkeypatch):
    seen = []
    forward = vit.VisionTransformer.forward

    def recording_forward(self, x):
        seen.append((self.cls_token.requires_grad, x.shape[-1]))
        return forward(self, x)
    monkeypatch.setattr(vit.VisionTransformer, "forward", recording_forward)
    student, teacher, _ = train.main(train.get_args(tiny_args(folder, tmp_path, "--epochs", "1")))
    assert {size for trainable, size in seen if not trainable} == {32}  # teacher: global crops only
    assert {size for trainable, size in seen if trainable} == {32, 16}  # student: every crop
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_a_short_run_gives_a_finite_loss_a_full_log_and_a_loadable_checkpoint(folder, tmp_path):
    train.main(train.get_args(tiny_args(folder, tmp_path)))
    logs = [json.loads(line) for line in open(tmp_path / "log.txt")]
    assert [log["epoch"] for log in logs] == [0, 1]
    for key in ("loss", "teacher_entropy", "kl", "lr", "wd", "momentum", "teacher_temp", "img_per_s"):
        assert math.isfinite(logs[-1][key]), key
    backbone = vit.vit_tiny(patch_size=8, depth=1, img_size=32)
    vit.load_pretrained_weights(backbone, tmp_path / "checkpoint.pth")
    assert not os.path.exists(tmp_path / "checkpoint.pth.tmp")


def test_the_last_layer_is_frozen_in_the_first_epoch_only(folder, tmp_path):
    args = train.get_args(tiny_args(folder, tmp_path, "--saveckp_freq", "1", "--freeze_last_layer", "1"))
    torch.manual_seed(args.seed)
    initial = train.build_model(args, args.drop_path_rate).head.last_layer.weight_v.detach().clone()
    train.main(args)
    after = [torch.load(tmp_path / f"checkpoint{e:04}.pth", weights_only=False)["student"]["head.last_layer.weight_v"]
             for e in (0, 1)]
    assert torch.equal(after[0], initial) and not torch.equal(after[1], initial)


def test_stopping_after_an_epoch_and_rerunning_equals_an_uninterrupted_run(folder, tmp_path):
    train.main(train.get_args(tiny_args(folder, tmp_path / "straight")))
    train.main(train.get_args(tiny_args(folder, tmp_path / "resumed", "--stop_after_epoch", "0")))
    assert torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=False)["epoch"] == 1
    train.main(train.get_args(tiny_args(folder, tmp_path / "resumed")))
    assert_same_weights(teacher_of(tmp_path / "straight"), teacher_of(tmp_path / "resumed"))


def test_center_momentum_flag_reaches_the_loss(folder, tmp_path, monkeypatch):
    seen = []

    class Recording(train.DINOLoss):
        def __init__(self, *a, **kw):
            seen.append(kw["center_momentum"])
            super().__init__(*a, **kw)

    monkeypatch.setattr(train, "DINOLoss", Recording)
    train.main(train.get_args(tiny_args(folder, tmp_path, "--center_momentum", "0.25", "--epochs", "1")))
    assert seen == [0.25]


def test_use_bn_in_head_puts_batchnorm_in_both_heads_whose_statistics_follow_the_batches(folder, tmp_path):
    has_bn = lambda args: any(isinstance(m, torch.nn.BatchNorm1d) for m in train.build_model(args, 0.0).modules())
    assert not has_bn(train.get_args(tiny_args(folder, tmp_path)))  # off by default, as in the official code
    train.main(train.get_args(tiny_args(folder, tmp_path, "--use_bn_in_head", "true", "--epochs", "1")))
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    for net in ("student", "teacher"):  # the teacher runs in training mode, as official: batch statistics
        means = [v for k, v in ckpt[net].items() if k.startswith("head.") and k.endswith("running_mean")]
        assert len(means) == 2 and all(m.abs().sum() > 0 for m in means), net


def test_resuming_with_flags_that_change_the_schedules_is_refused(folder, tmp_path):
    train.main(train.get_args(tiny_args(folder, tmp_path, "--stop_after_epoch", "0")))
    with pytest.raises(train.UserError, match="--lr"):
        train.main(train.get_args(tiny_args(folder, tmp_path, "--lr", "0.1")))


def test_sigterm_mid_epoch_saves_and_rerunning_reaches_the_same_teacher(folder, tmp_path):
    flags = ["--batch_size", "4", "--log_every", "1"]
    assert run_cli(tiny_args(folder, tmp_path / "straight", *flags)).returncode == 0
    log = open(tmp_path / "stderr.txt", "w+")
    proc = subprocess.Popen([sys.executable, "train.py", *tiny_args(folder, tmp_path / "killed", *flags)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=log, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and "loss=" not in open(tmp_path / "stderr.txt").read():
        time.sleep(0.05)  # wait until training has taken a few steps
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 128 + signal.SIGTERM
    assert "interrupted: checkpoint saved" in open(tmp_path / "stderr.txt").read()
    it = torch.load(tmp_path / "killed" / "checkpoint.pth", weights_only=False)["iteration"]
    assert 0 < it < 16  # 8 iterations per epoch, 2 epochs: stopped before the end
    assert run_cli(tiny_args(folder, tmp_path / "killed", *flags)).returncode == 0
    assert_same_weights(teacher_of(tmp_path / "straight"), teacher_of(tmp_path / "killed"))


DDP_WORKER = """
import sys, torch, torch.distributed as dist
import train
student, teacher, loss = train.main(train.get_args(sys.argv[1:-1]))
torch.save({"student": student.state_dict(), "center": loss.center}, f"{sys.argv[-1]}/rank{dist.get_rank()}.pth")
"""


def test_two_process_gloo_run_keeps_both_ranks_identical(folder, tmp_path):
    (tmp_path / "worker.py").write_text(DDP_WORKER)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "worker.py"), *tiny_args(folder, out, "--batch_size", "4", "--epochs", "1"),
                           str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r0, r1 = (torch.load(out / f"rank{r}.pth", weights_only=False) for r in (0, 1))
    assert_same_weights(r0["student"], r1["student"])
    assert torch.equal(r0["center"], r1["center"]) and r0["center"].abs().sum() > 0


@pytest.mark.slow
def test_two_nodes_of_one_process_each_train_one_run_whose_checkpoint_evaluates(folder, tmp_path, capsys):
    """Across machines (README): one torchrun per node, --nnodes 2 --node_rank 0|1 --master_addr --master_port;
    here both "nodes" are on 127.0.0.1, one process each (gloo), and rank 0 writes the checkpoint."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(r),
                               "--master_addr", "127.0.0.1", "--master_port", port, "--nproc_per_node", "1",
                               "train.py", *tiny_args(folder, out, "--epochs", "1", "--batch_size", "4")],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (1, 0)]
    logs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[1][1][-2000:] + logs[0][1][-2000:]
    stdout = logs[1][0]
    assert "2 process(es) x 4" in stdout and re.search(r"epoch 0 loss [\d.]+", stdout)  # rank 0 prints
    assert "epoch 0" not in logs[0][0]  # the node of rank 1 prints nothing
    assert torch.load(out / "checkpoint.pth", weights_only=False)["args"]["world_size"] == 2
    assert eval_knn.main([str(out / "checkpoint.pth"), "--num_workers", "0", "--nb_knn", "5"]) == 0
    assert re.search(r"5-NN classifier result: Top1: [\d.]+", capsys.readouterr().out)


@pytest.mark.parametrize("flags,message", [
    (["--local_size", "64", "--global_size", "32"], "larger than --global_size"),
    (["--patch", "16", "--global_size", "40"], "does not divide"),
    (["--arch", "vit_huge"], "unknown --arch"),
    (["--teacher", "ema"], "unknown --teacher"),
    (["--patch_drop", "1", "0"], "must be in [0, 1)"),
    (["--curriculum_epochs", "2", "--curriculum_sizes", "36", "24"], "does not divide"),
    (["--data", "/no/such/folder"], "not found"),
])
def test_bad_flags_and_paths_give_one_line_and_exit_code_2(tmp_path, flags, message):
    proc = run_cli(["--output_dir", str(tmp_path), *flags])
    assert proc.returncode == 2 and message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_folder_with_a_corrupt_and_a_truncated_image_trains_to_the_end(folder, tmp_path):
    import shutil
    root = tmp_path / "imgs"
    shutil.copytree(folder, root)
    good = sorted((root / "train").rglob("*.png"))
    (good[0].parent / "corrupt.png").write_bytes(b"this is not an image")
    data_bytes = good[1].read_bytes()
    (good[1].parent / "truncated.png").write_bytes(data_bytes[: len(data_bytes) // 2])
    proc = run_cli(tiny_args(str(root), tmp_path / "out", "--epochs", "1", "--batch_size", "2"))
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert "unreadable" in proc.stderr
    assert os.path.isfile(tmp_path / "out" / "checkpoint.pth")


def test_every_iteration_of_main_is_one_call_of_train_one_step(folder, tmp_path, monkeypatch):
    """main's loop trains only through train_one_step, the function benchmark.py times: the two cannot drift."""
    losses, step = [], train.train_one_step

    def recording(*args, **kwargs):
        losses.append(float(step(*args, **kwargs)))
        return torch.tensor(losses[-1])
    monkeypatch.setattr(train, "train_one_step", recording)
    train.main(train.get_args(tiny_args(folder, tmp_path)))
    logs = [json.loads(line) for line in open(tmp_path / "log.txt")]
    assert len(losses) == 2 * 4  # 2 epochs of 32 images in batches of 8
    for epoch, log in enumerate(logs):  # the logged loss is the mean of the steps' losses
        assert log["loss"] == pytest.approx(np.mean(losses[4 * epoch:4 * epoch + 4]), rel=1e-6)


def test_loader_workers_give_the_batches_of_the_main_process(folder, tmp_path):
    """The views of a batch are made in the DataLoader's collate step (augment.MultiCropAugmentation.batch), in a
    worker process when --num_workers > 0; a batch's views depend on (seed, epoch, image) only, not on where."""
    batches = {}
    for workers in (0, 2):
        args = train.get_args(tiny_args(folder, tmp_path, "--num_workers", str(workers)))
        dataset, sampler, _ = train.multicrop_data(args, 0, 1)
        batches[workers] = list(train.epoch_loader(dataset, sampler, 1, 0, args, torch.device("cpu")))
    assert len(batches[0]) == len(batches[2]) == 4  # 32 images, batch 8
    for main, worker in zip(batches[0], batches[2]):
        assert [tuple(v.shape) for v in main] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 2
        assert all(torch.equal(a, b) for a, b in zip(main, worker))


# ---- the speed levers: a resolution curriculum and student patch dropping (flags, off in both presets) ----
def test_the_speed_levers_are_off_unless_asked_for():
    for preset in ("paper", "cpu"):  # they change the method: a flag turns each on (docs/cpu_recipe.md)
        args = train.get_args(["--preset", preset])
        assert args.curriculum_epochs == 0 and args.patch_drop == (0.0, 0.0)
    quick = train.get_args(["--curriculum_epochs", "3", "--patch_drop", "0.5", "0.5"])
    assert train.crop_sizes(quick, 2) == (48, 24) and train.patch_drop_ratio(quick, 5) == 0.5


def test_the_curriculum_gives_the_small_crops_first_then_the_full_sizes(folder, tmp_path):
    args = train.get_args(tiny_args(folder, tmp_path, "--epochs", "3", "--curriculum_epochs", "2",
                                    "--curriculum_sizes", "16", "8"))
    assert [train.crop_sizes(args, e) for e in range(3)] == [(16, 8), (16, 8), (32, 16)]
    dataset, sampler, _ = train.multicrop_data(args, 0, 1)
    for epoch, (g, loc) in [(1, (16, 8)), (2, (32, 16))]:
        crops = next(iter(train.epoch_loader(dataset, sampler, epoch, 0, args, torch.device("cpu"))))
        assert [tuple(v.shape) for v in crops] == [(8, 3, g, g)] * 2 + [(8, 3, loc, loc)] * 2


def test_patch_drop_falls_linearly_from_its_first_to_its_last_value_over_the_epochs(folder, tmp_path):
    args = train.get_args(tiny_args(folder, tmp_path, "--epochs", "5", "--patch_drop", "0.6", "0.2"))
    assert [train.patch_drop_ratio(args, e) for e in range(5)] == pytest.approx([0.6, 0.5, 0.4, 0.3, 0.2])


def test_only_the_students_global_views_drop_patches_the_teacher_sees_them_whole(folder, tmp_path, monkeypatch):
    args = train.get_args(tiny_args(folder, tmp_path, "--patch_drop", "0.5", "0.5"))
    student, teacher = train.build_model(args, 0.0), train.build_model(args, 0.0)
    calls = []
    for name, net in (("student", student), ("teacher", teacher)):
        forward = net.backbone.forward
        monkeypatch.setattr(net.backbone, "forward", lambda x, drop_ratio=0.0, name=name, forward=forward:
                            calls.append((name, x.shape[0], x.shape[-1], drop_ratio)) or forward(x, drop_ratio))
    dataset, sampler, _ = train.multicrop_data(args, 0, 1)
    crops = next(iter(train.epoch_loader(dataset, sampler, 0, 0, args, torch.device("cpu"))))
    optimizer = torch.optim.AdamW(train.param_groups(student))
    loss = train.DINOLoss(args.out_dim, 4, 0.04, 0.04, 0, args.epochs)
    scaler, autocast = torch.amp.GradScaler("cpu", enabled=False), torch.autocast("cpu", enabled=False)
    train.train_one_step(student, teacher, loss, optimizer, scaler, autocast, crops, 0, 1e-3, 0.04, 0.99, args)
    assert sorted(calls) == [("student", 16, 16, 0.0), ("student", 16, 32, 0.5), ("teacher", 16, 32, 0.0)]


def test_a_run_stopped_mid_curriculum_resumes_to_the_same_teacher(folder, tmp_path):
    levers = ["--epochs", "3", "--curriculum_epochs", "2", "--curriculum_sizes", "16", "8", "--patch_drop", "0.5", "0"]
    train.main(train.get_args(tiny_args(folder, tmp_path / "straight", *levers)))
    train.main(train.get_args(tiny_args(folder, tmp_path / "resumed", *levers, "--stop_after_epoch", "0")))
    train.main(train.get_args(tiny_args(folder, tmp_path / "resumed", *levers)))
    assert_same_weights(teacher_of(tmp_path / "straight"), teacher_of(tmp_path / "resumed"))


def test_the_online_knn_runs_every_n_epochs_and_after_the_last(folder, tmp_path):
    train.main(train.get_args(tiny_args(folder, tmp_path, "--epochs", "3", "--knn_every", "2")))
    logs = [json.loads(line) for line in open(tmp_path / "log.txt")]
    assert ["knn_top1" in log for log in logs] == [False, True, True]
    assert ["knn_top1_student" in log for log in logs] == [False, True, True]  # Fig. 6 (left): the two side by side


# ============ Fig. 6 (right): the teachers ============
def recorded_steps(monkeypatch):
    """(student before, student after, teacher after) of every step main runs, each as one flat vector."""
    steps, step = [], train.train_one_step
    flat = lambda net: torch.cat([p.detach().flatten() for p in net.parameters()]).clone()

    def recording(student, teacher, *args):
        before = flat(student)
        loss = step(student, teacher, *args)
        steps.append((before, flat(student), flat(teacher)))
        return loss
    monkeypatch.setattr(train, "train_one_step", recording)
    return steps


def test_the_previous_iteration_teacher_is_the_student_before_the_step(folder, tmp_path, monkeypatch):
    steps = recorded_steps(monkeypatch)
    train.main(train.get_args(tiny_args(folder, tmp_path, "--teacher", "previous_iter")))
    assert len(steps) == 8 and all(torch.equal(teacher, before) for before, _, teacher in steps)
    assert not any(torch.equal(after, before) for before, after, _ in steps[1:])  # step 0 has lr 0 (warm-up)


def test_the_student_copy_teacher_is_the_student_after_each_step(folder, tmp_path, monkeypatch):
    steps = recorded_steps(monkeypatch)
    train.main(train.get_args(tiny_args(folder, tmp_path, "--teacher", "student")))
    assert all(torch.equal(teacher, after) for _, after, teacher in steps)


def test_the_previous_epoch_teacher_changes_only_at_epoch_ends(folder, tmp_path, monkeypatch):
    steps = recorded_steps(monkeypatch)
    train.main(train.get_args(tiny_args(folder, tmp_path, "--teacher", "previous_epoch", "--epochs", "3")))
    per_epoch = len(steps) // 3  # 4 steps an epoch
    for epoch in range(3):
        start = steps[0][0] if epoch == 0 else steps[epoch * per_epoch - 1][1]  # the student as the epoch began
        assert all(torch.equal(teacher, start) for _, _, teacher in steps[epoch * per_epoch:(epoch + 1) * per_epoch])
    assert not torch.equal(steps[0][0], steps[per_epoch - 1][1])  # and the student did move


def test_a_previous_epoch_teacher_run_stopped_after_an_epoch_resumes_to_the_same_teacher(folder, tmp_path):
    teacher = ["--teacher", "previous_epoch", "--epochs", "3"]
    train.main(train.get_args(tiny_args(folder, tmp_path / "straight", *teacher)))
    train.main(train.get_args(tiny_args(folder, tmp_path / "resumed", *teacher, "--stop_after_epoch", "1")))
    train.main(train.get_args(tiny_args(folder, tmp_path / "resumed", *teacher)))
    assert_same_weights(teacher_of(tmp_path / "straight"), teacher_of(tmp_path / "resumed"))
