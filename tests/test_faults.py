"""Faults a long run meets (DESIGN.md Sec. 8): a full disk, a folder it may not write, kill -9 at any instant.

Every file is written whole or not at all (checkpoint.write_atomic); a write that fails stops the run with one line
naming the file, the cause and the checkpoint kept, exit code 2, and no temporary file; log.txt is the history that
checkpoint.pth holds, so the two agree after any crash. A full disk is a real tmpfs where this machine lets us
mount one, and otherwise a stand-in: files whose writes fail with ENOSPC once their folder would outgrow a size.
"""
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import checkpoint
import data
import eval_linear
import train
import variants  # noqa: F401  (lab/variants.py: the lab's datasets; the tiny runs here draw from "shapes")
import visualize_attention
import vit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return data.make_folder_dataset(str(tmp_path_factory.mktemp("imgs")), n_train=32, n_val=20, size=32,
                                    variant="shapes")


def tiny_args(folder, out, *extra):  # 32 images in batches of 16: 2 steps per epoch
    return ["--data", folder, "--arch", "vit_tiny", "--patch", "8", "--depth", "1", "--out_dim", "32",
            "--global_size", "32", "--local_size", "16", "--local_crops_number", "2", "--batch_size", "16",
            "--epochs", "3", "--warmup_epochs", "1", "--num_workers", "0", "--knn_every", "0",
            "--output_dir", str(out), *extra]


def saved(out):
    """(checkpoint.pth as it is on disk, the epochs of log.txt) of a run's folder."""
    ckpt = torch.load(os.path.join(out, "checkpoint.pth"), map_location="cpu", weights_only=False)
    return ckpt, [json.loads(line)["epoch"] for line in open(os.path.join(out, "log.txt"))]


def leftovers(out):
    return [f for f in os.listdir(out) if f.endswith(".tmp")]


class SmallDisk(io.FileIO):
    """A stand-in for a file system of `capacity` bytes: a write fails with ENOSPC once the files of its folder
    would hold more (the file being written included: FileIO does not buffer)."""
    capacity = 0

    def write(self, b):
        folder = os.path.dirname(self.name)
        used = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        if used + memoryview(b).nbytes > self.capacity:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(b)


def small_disk(monkeypatch, capacity):
    """checkpoint.write_atomic's files from now on live on a SmallDisk of `capacity` bytes."""
    monkeypatch.setattr(SmallDisk, "capacity", capacity)
    monkeypatch.setattr(checkpoint, "open", lambda path, mode: SmallDisk(path, mode.replace("b", "")), raising=False)


# ============ one write ============
def test_a_write_that_fails_halfway_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    path = str(tmp_path / "checkpoint.pth")
    checkpoint.save({"epoch": 0}, path)

    def half_then_full(f):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(checkpoint.WriteError, match=r"could not write .*checkpoint.pth: No space left on device$"):
        checkpoint.write_atomic(path, half_then_full)
    assert os.listdir(tmp_path) == ["checkpoint.pth"] and checkpoint.load(path) == {"epoch": 0}


def test_torch_save_onto_a_full_disk_says_so_instead_of_unexpected_pos(tmp_path, monkeypatch):
    """torch.save swallows the OSError of its file and raises 'unexpected pos'; the cause still reaches the user."""
    path = str(tmp_path / "checkpoint.pth")
    checkpoint.save({"w": torch.zeros(1000)}, path)
    small_disk(monkeypatch, os.path.getsize(path) + 20_000)
    with pytest.raises(checkpoint.WriteError, match="No space left on device") as e:
        checkpoint.save({"w": torch.ones(100_000)}, path)
    assert e.value.errno == errno.ENOSPC and isinstance(e.value, OSError)
    assert os.listdir(tmp_path) == ["checkpoint.pth"] and torch.equal(checkpoint.load(path)["w"], torch.zeros(1000))


# ============ train.py: full disk, no permission ============
@pytest.fixture(scope="module")
def checkpoint_size(folder, tmp_path_factory):
    """Bytes of one checkpoint.pth of tiny_args."""
    out = tmp_path_factory.mktemp("probe")
    train.main(train.get_args(tiny_args(folder, out, "--epochs", "1")))
    return os.path.getsize(out / "checkpoint.pth")


def test_training_onto_a_full_disk_stops_at_the_save_and_keeps_the_last_checkpoint(folder, tmp_path, monkeypatch,
                                                                                    checkpoint_size):
    size = checkpoint_size
    small_disk(monkeypatch, int(1.5 * size))  # one checkpoint and half of another
    with pytest.raises(train.UserError) as e:
        train.main(train.get_args(tiny_args(folder, tmp_path / "out")))
    assert str(e.value) == (f"could not write {tmp_path / 'out' / 'checkpoint.pth'}: No space left on device; the "
                            "checkpoint of epoch 0 is kept; free space and re-run to resume")
    ckpt, logged = saved(tmp_path / "out")
    assert [h["epoch"] for h in ckpt["history"]] == logged == [0] and not leftovers(tmp_path / "out")


def can_mount_tmpfs():
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or not shutil.which("mount"):
        return False
    with tempfile.TemporaryDirectory() as d:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", d], capture_output=True).returncode:
            return False
        subprocess.run(["umount", d], check=True)
    return True


@pytest.mark.skipif(not can_mount_tmpfs(), reason="cannot mount a tmpfs here (needs root on Linux); the stand-in "
                    "test above covers the same path")
def test_train_py_onto_a_real_full_tmpfs_prints_one_error_line_and_exits_2(folder, tmp_path, checkpoint_size):
    size = checkpoint_size
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(1.5 * size)}", "tmpfs", str(disk)], check=True)
    try:
        proc = subprocess.run([sys.executable, "train.py", *tiny_args(folder, disk / "out")], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert errors == [f"error: could not write {disk / 'out' / 'checkpoint.pth'}: No space left on device; "
                          "the checkpoint of epoch 0 is kept; free space and re-run to resume"]
        ckpt, logged = saved(disk / "out")
        assert [h["epoch"] for h in ckpt["history"]] == logged == [0] and not leftovers(disk / "out")
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("how", ["stand-in", "chmod"])
def test_an_output_folder_that_cannot_be_written_stops_the_run_before_it_trains(folder, tmp_path, monkeypatch, how):
    out = tmp_path / "out"
    train.main(train.get_args(tiny_args(folder, out, "--stop_after_epoch", "0")))
    before = (out / "checkpoint.pth").read_bytes()
    if how == "chmod":
        if os.geteuid() == 0:
            pytest.skip("root writes to a read-only folder anyway")
        out.chmod(0o555)
    else:
        def denied(path, mode):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        monkeypatch.setattr(checkpoint, "open", denied, raising=False)
    steps = []
    monkeypatch.setattr(train, "train_one_step", lambda *a, **kw: steps.append(1))
    try:
        with pytest.raises(train.UserError) as e:
            train.main(train.get_args(tiny_args(folder, out)))
    finally:
        out.chmod(0o755)
    assert str(e.value) == (f"could not write {out / 'log.txt'}: Permission denied; the checkpoint of epoch 0 is kept; "
                            f"make {out} writable and re-run to resume")
    assert steps == [] and (out / "checkpoint.pth").read_bytes() == before and not leftovers(out)


# ============ eval_linear.py and visualize_attention.py ============
def test_the_evaluation_scripts_answer_a_full_disk_in_one_line(folder, tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    sd = {f"backbone.{k}": v for k, v in vit.vit_tiny(patch_size=8, depth=1, img_size=32).state_dict().items()}
    args = {"arch": "vit_tiny", "patch_size": 8, "depth": 1, "global_size": 32, "data": folder}
    torch.save({"teacher": sd, "args": args}, tmp_path / "checkpoint.pth")
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
    (tmp_path / "pictures").mkdir()
    small_disk(monkeypatch, 500)  # not even one picture fits
    assert visualize_attention.main([str(tmp_path / "checkpoint.pth"), "--image", str(image),
                                     "--output_dir", str(tmp_path / "pictures")]) == 2
    assert capsys.readouterr().err == (f"error: could not write {tmp_path / 'pictures' / 'img.png'}: "
                                       "No space left on device\n")
    assert os.listdir(tmp_path / "pictures") == []
    (tmp_path / "linear").mkdir()
    small_disk(monkeypatch, 300)  # a line or two of the log, not the layer
    assert eval_linear.main([str(tmp_path / "checkpoint.pth"), "--epochs", "2", "--num_workers", "0",
                             "--n_last_blocks", "1", "--output_dir", str(tmp_path / "linear")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: could not write {tmp_path / 'linear'}") and "No space left on device" in err
    assert len(err.splitlines()) == 1 and not leftovers(tmp_path / "linear")


# ============ log.txt and checkpoint.pth agree ============
def test_resuming_rewrites_a_damaged_log_from_the_checkpoint_history(folder, tmp_path):
    train.main(train.get_args(tiny_args(folder, tmp_path, "--epochs", "2", "--stop_after_epoch", "0")))
    line = (tmp_path / "log.txt").read_text()
    (tmp_path / "log.txt").write_text(line + line + line[:20])  # epoch 0 twice, then half a line
    train.main(train.get_args(tiny_args(folder, tmp_path, "--epochs", "2")))
    ckpt, logged = saved(tmp_path)
    assert logged == [0, 1] and [json.loads(s) for s in open(tmp_path / "log.txt")] == ckpt["history"]


def test_a_signal_in_the_last_step_of_an_epoch_saves_that_epoch_and_its_log_line(folder, tmp_path, monkeypatch):
    """Saved mid-loop at the last step, the epoch's log line was never written and a resume skipped it."""
    stop, step, calls = {"signal": None}, train.train_one_step, []

    def step_then_signal(*a, **kw):
        calls.append(1)
        if len(calls) == 2:  # the last of epoch 0's 2 steps
            stop["signal"] = signal.SIGTERM
        return step(*a, **kw)
    monkeypatch.setattr(train, "catch_stop_signals", lambda: stop)
    monkeypatch.setattr(train, "train_one_step", step_then_signal)
    with pytest.raises(SystemExit) as e:
        train.main(train.get_args(tiny_args(folder, tmp_path, "--epochs", "2")))
    assert e.value.code == 128 + signal.SIGTERM
    ckpt, logged = saved(tmp_path)
    assert ckpt["iteration"] == 2 and ckpt["epoch_sums"] is None and logged == [0]
    monkeypatch.undo()
    train.main(train.get_args(tiny_args(folder, tmp_path, "--epochs", "2")))
    assert saved(tmp_path)[1] == [0, 1]


# ============ kill -9 ============
KILLED = """
import io, os, runpy, signal, sys
import torch
import checkpoint

point, epoch = sys.argv[1], int(sys.argv[2])  # SIGKILL at `point` of epoch `epoch`; the rest: train.py's flags
sys.argv = ["train.py", *sys.argv[3:]]
die = lambda *_: os.kill(os.getpid(), signal.SIGKILL)
save, write_text = checkpoint.save, checkpoint.write_text

def save_or_die(state, path):  # 'save': half of checkpoint.pth.tmp written
    if point == "save" and path.endswith("checkpoint.pth") and state["history"][-1:] and \\
            state["history"][-1]["epoch"] == epoch:
        blob = io.BytesIO()
        torch.save(state, blob)
        checkpoint.write_atomic(path, lambda f: (f.write(blob.getvalue()[:blob.tell() // 2]), f.flush(), die()))
    save(state, path)

def write_text_or_die(path, text):  # 'log': checkpoint.pth holds the epoch; half of log.txt.tmp written
    if point == "log" and path.endswith("log.txt") and f'"epoch": {epoch},' in text:
        checkpoint.write_atomic(path, lambda f: (f.write(text[:len(text) // 2].encode()), f.flush(), die()))
    write_text(path, text)

checkpoint.save, checkpoint.write_text = save_or_die, write_text_or_die
runpy.run_path("train.py", run_name="__main__")
"""


def run_killed(tmp_path, folder, out, point, epoch):
    (tmp_path / "killed.py").write_text(KILLED)
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, str(tmp_path / "killed.py"), point, str(epoch), *tiny_args(folder, out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_kill_9_while_writing_the_log_after_the_checkpoint_loses_no_line_after_the_rerun(folder, tmp_path):
    out = tmp_path / "out"
    proc = run_killed(tmp_path, folder, out, "log", 1)  # epoch 1's checkpoint written, its log half
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpt, logged = saved(out)
    assert [h["epoch"] for h in ckpt["history"]] == [0, 1] and logged == [0] and leftovers(out) == ["log.txt.tmp"]
    train.main(train.get_args(tiny_args(folder, out)))
    ckpt, logged = saved(out)
    assert logged == [0, 1, 2] and [json.loads(s) for s in open(out / "log.txt")] == ckpt["history"]
    assert not leftovers(out)


@pytest.mark.slow
def test_kill_9_inside_a_save_and_between_checkpoint_and_log_then_a_rerun_equals_a_straight_run(folder, tmp_path):
    straight, out = tmp_path / "straight", tmp_path / "out"
    proc = run_killed(tmp_path, folder, out, "save", 1)  # killed while writing epoch 1's checkpoint
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpt, logged = saved(out)
    assert [h["epoch"] for h in ckpt["history"]] == logged == [0]  # the previous checkpoint, whole
    assert leftovers(out) == ["checkpoint.pth.tmp"]  # what a kill -9 leaves; the next save replaces it
    proc = run_killed(tmp_path, folder, out, "log", 1)  # resumed at epoch 1, killed after its checkpoint
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpt, logged = saved(out)
    assert [h["epoch"] for h in ckpt["history"]] == [0, 1] and logged == [0]  # one line short, until the resume
    assert leftovers(out) == ["log.txt.tmp"]  # checkpoint.pth.tmp was replaced by the save that followed
    train.main(train.get_args(tiny_args(folder, out)))
    train.main(train.get_args(tiny_args(folder, straight)))
    ckpt, logged = saved(out)
    assert logged == [0, 1, 2] and [json.loads(s) for s in open(out / "log.txt")] == ckpt["history"]
    assert not leftovers(out)
    teacher = saved(straight)[0]["teacher"]
    for k, v in ckpt["teacher"].items():
        torch.testing.assert_close(v, teacher[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_kill_9_at_random_instants_then_a_rerun_finishes_with_one_log_line_per_epoch(folder, tmp_path):
    """As a user would: SIGKILL from outside at random moments, then the same command again until it finishes."""
    rng, out, kills = np.random.default_rng(0), tmp_path / "out", 0
    cmd = [sys.executable, "train.py", *tiny_args(folder, out, "--epochs", "4", "--batch_size", "8")]
    while kills < 4:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(3, 9))  # in the import, the build, a step or a save
            break  # finished before the kill
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
    assert kills >= 1 and subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=300).returncode == 0
    ckpt, logged = saved(out)
    assert logged == [0, 1, 2, 3] and [json.loads(s) for s in open(out / "log.txt")] == ckpt["history"]
    assert not leftovers(out)


# ============ loader workers ============
def test_more_loader_workers_than_cpus_are_lowered_with_one_line_and_torch_stays_silent(monkeypatch, capsys):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # this process may use 2 CPUs
    with pytest.warns(UserWarning, match="worker"):  # what torch says of 10 (the paper preset's)
        DataLoader(range(4), num_workers=10).check_worker_number_rationality()
    assert train.loader_workers(10, rank=0) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--num_workers 10" in err and "2 CPUs" in err
    assert train.loader_workers(2, rank=0) == 2 and train.loader_workers(0, rank=0) == 0
    assert capsys.readouterr().err == ""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DataLoader(range(4), num_workers=2).check_worker_number_rationality()
