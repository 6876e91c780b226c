"""The CUDA path (DESIGN.md Sec. 7): `python -m pytest -m gpu` on a machine with a GPU; skipped without CUDA.

The paper preset's step (ViT-S/16, 2x224 + 10x96, K 65,536) on random images, fp16 with GradScaler, bf16 autocast
against fp32, a one-process nccl group through train.py (with SyncBatchNorm), SDPA's fused kernels against the math
path, k-NN on CUDA against the CPU, a resume on CUDA, and benchmark.py's CUDA path at a small size.
`bash lab/gpu_check.sh` runs these, then benchmark.py at full size.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import augment
import benchmark
import data
import eval_knn
import train
import vit
from loss import DINOLoss
from test_train import folder, tiny_args  # noqa: F401  (the CPU tests' tiny image folder and run)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.is_available() is "
                                 "False): run `python -m pytest -m gpu` on a machine with a GPU")]
CUDA = torch.device("cuda")


def relative_error(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def paper_step(args, precision, center_momentum):
    """Student, teacher, loss, fused AdamW, GradScaler and autocast as train.main builds them, on CUDA."""
    torch.manual_seed(0)
    student = train.build_model(args, args.drop_path_rate).to(CUDA)
    teacher = train.build_model(args, 0.0).to(CUDA)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    dino_loss = DINOLoss(args.out_dim, 2 + args.local_crops_number, args.warmup_teacher_temp, args.teacher_temp,
                         args.warmup_teacher_temp_epochs, args.epochs, center_momentum=center_momentum).to(CUDA)
    optimizer = torch.optim.AdamW(train.param_groups(student), lr=0.0, fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    autocast = torch.autocast("cuda", dtype=torch.float16 if precision == "fp16" else torch.bfloat16,
                              enabled=precision != "fp32")
    return student, teacher, dino_loss, optimizer, scaler, autocast


def random_crops(args, batch_size, seed=0):
    """uint8 views of the preset's sizes, as the loader yields them (2 global, then the local ones)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [args.global_size] * 2 + [args.local_size] * args.local_crops_number
    return [torch.randint(0, 256, (batch_size, 3, s, s), dtype=torch.uint8, generator=g).pin_memory() for s in sizes]


# ============ the paper preset, fp16, bf16 ============
@pytest.mark.parametrize("precision", ["auto", "fp16"])
def test_the_paper_preset_step_on_cuda_gives_a_finite_falling_loss(precision):
    """Its target held (centre and teacher fixed), the student's loss on a batch of random images falls step by step;
    with the preset's centre and teacher momentum it stays finite and the teacher moves."""
    args = train.get_args(["--preset", "paper"])
    assert (args.arch, args.patch_size, args.depth, args.out_dim, args.global_size, args.local_size,
            args.local_crops_number) == ("vit_small", 16, 12, 65536, 224, 96, 10)
    precision = train.resolve_precision(precision, CUDA)
    crops, epoch = random_crops(args, 16), args.freeze_last_layer  # past the frozen last layer: all of it trains
    student, teacher, dino_loss, optimizer, scaler, autocast = paper_step(args, precision, center_momentum=1.0)
    held = [float(train.train_one_step(student, teacher, dino_loss, optimizer, scaler, autocast, crops, epoch,
                                       5e-4, 0.04, 1.0, args)) for _ in range(10)]  # fp16: the first may be skipped
    assert all(torch.isfinite(torch.tensor(held))), held
    assert held[-1] < held[0] - 0.05 and held[5] < held[0], held
    student, teacher, dino_loss, optimizer, scaler, autocast = paper_step(args, precision, args.center_momentum)
    before = [p.clone() for p in teacher.parameters()]
    losses = [float(train.train_one_step(student, teacher, dino_loss, optimizer, scaler, autocast, crops, epoch,
                                         5e-4, 0.04, args.momentum_teacher, args)) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert any(not torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    if precision == "fp16":
        assert 0 < scaler.get_scale() < float("inf")
    print(f"paper preset, {precision}, 16 images: held-target losses {held}, preset losses {losses}, "
          f"peak memory {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB")


def test_fp16_with_grad_scaler_trains_through_train_py_with_pinned_memory_and_workers(folder, tmp_path):
    train.main(train.get_args(tiny_args(folder, tmp_path, "--precision", "fp16", "--num_workers", "2")))
    logs = [json.loads(line) for line in open(tmp_path / "log.txt")]
    assert [log["epoch"] for log in logs] == [0, 1] and all(torch.isfinite(torch.tensor(log["loss"])) for log in logs)
    ckpt = torch.load(tmp_path / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert 0 < ckpt["scaler"]["scale"] < float("inf") and ckpt["args"]["precision"] == "fp16"


def test_bf16_autocast_on_cuda_matches_fp32_within_tolerance():
    args = train.get_args(["--preset", "paper", "--depth", "4"])  # ViT-S/16 and the K 65,536 head; 4 blocks
    torch.manual_seed(0)
    net = train.build_model(args, 0.0).to(CUDA)
    crops = [augment.normalize(c.to(CUDA)) for c in random_crops(args, 8)]

    def forward(enabled):
        dino_loss = DINOLoss(args.out_dim, 12, 0.04, 0.04, 0, 1).to(CUDA)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled):
            out, features = net(crops, return_features=True)  # (12·B, K), (12·B, D)
            loss = dino_loss(out, out[:2 * 8], 0)
        return out.float(), features.float(), loss
    out32, features32, loss32 = forward(False)
    out16, features16, loss16 = forward(True)
    assert F.cosine_similarity(features16, features32).min() > 0.999
    assert relative_error(features16, features32) < 0.03 and relative_error(out16, out32) < 0.03
    assert loss16.dtype == torch.float32 and abs(float(loss16 - loss32)) < 0.01 * float(loss32)


# ============ distributed ============
NCCL_WORKER = """
import os, sys, torch, torch.distributed as dist
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group("nccl")  # one process: distributed.init joins a group itself only for WORLD_SIZE > 1
import train
student, teacher, loss = train.main(train.get_args(sys.argv[1:]))
sync_bn = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in student.modules())
print(f"backend {dist.get_backend()} world {dist.get_world_size()} sync_bn {sync_bn} center {loss.center.device}")
dist.destroy_process_group()
"""


def test_a_one_process_nccl_group_runs_train_py_with_sync_batchnorm(folder, tmp_path):
    (tmp_path / "worker.py").write_text(NCCL_WORKER)
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           str(tmp_path / "worker.py"), *tiny_args(folder, tmp_path / "out", "--use_bn_in_head",
                                                                   "true")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "backend nccl world 1 sync_bn 2 center cuda:0" in proc.stdout, proc.stdout[-2000:]
    assert [json.loads(line)["epoch"] for line in open(tmp_path / "out" / "log.txt")] == [0, 1]


# ============ attention kernels ============
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sdpa_fused_kernels_match_the_math_path(dtype):
    """Flash and memory-efficient attention (cuDNN's where this GPU has it) against SDPA's math path in fp32, forward
    and backward, at ViT-S/16's global and local sequence lengths."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for B, N in ((16, 197), (48, 37)):
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, 6, N, 64, device=CUDA) for _ in range(3))
        grad = torch.randn(B, 6, N, 64, device=CUDA)

        def attend(backend, dtype):
            leaves = [t.to(dtype).clone().requires_grad_() for t in (q, k, v)]
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(*leaves)
            out.backward(grad.to(dtype))
            return [out] + [t.grad for t in leaves]
        reference = attend(SDPBackend.MATH, torch.float32)
        ran = []
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            try:
                fused = attend(backend, dtype)
            except RuntimeError:  # "No available kernel": flash needs sm80+, cuDNN's a recent GPU and cuDNN
                continue
            ran.append(backend.name)
            for name, a, b in zip(("out", "dq", "dk", "dv"), fused, reference):
                assert a.dtype == dtype and relative_error(a, b) < 0.02, (backend, N, name, relative_error(a, b))
        assert "EFFICIENT_ATTENTION" in ran and (torch.cuda.get_device_capability() < (8, 0) or
                                                 "FLASH_ATTENTION" in ran), ran


def test_vit_attention_on_cuda_equals_the_written_out_softmax():
    """vit.Attention takes SDPA on CUDA, with or without autocast; the maps (return_attention) are the same maths."""
    torch.manual_seed(0)
    attention = vit.Attention(384, 6).to(CUDA).requires_grad_(False)
    x = torch.randn(8, 197, 384, device=CUDA)
    B, N, C = x.shape
    q, k, v = attention.qkv(x).reshape(B, N, 3, 6, 64).permute(2, 0, 3, 1, 4)  # each (B, heads, N, 64)
    expected = attention.proj((attention(x, return_attention=True) @ v).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(attention(x), expected, rtol=1e-4, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert relative_error(attention(x), expected) < 0.02


# ============ evaluation and resume ============
def test_eval_knn_on_cuda_gives_the_cpu_features_and_accuracy(folder, tmp_path, capsys):
    train.main(train.get_args(tiny_args(folder, tmp_path, "--epochs", "1")))
    model, saved = vit.from_checkpoint(str(tmp_path / "checkpoint.pth"))
    dataset = data.build_dataset(folder, "val", augment.eval_transform(32))
    features = {}
    for device in (torch.device("cpu"), CUDA):
        model.to(device).eval()
        features[device.type], labels = eval_knn.extract_features(model, dataset, device, 8, 0, progress=False)
    assert relative_error(features["cuda"].cpu(), features["cpu"]) < 1e-2  # cuDNN convolutions may use TF32
    f = F.normalize(torch.randn(200, 32), dim=1)
    y = torch.arange(200) % 7
    on = {d: eval_knn.knn_classifier(f[:150].to(d), y[:150].to(d), f[150:].to(d), y[150:].to(d), 20, 0.07, 7)
          for d in ("cpu", "cuda")}
    assert on["cpu"] == pytest.approx(on["cuda"])
    capsys.readouterr()
    assert eval_knn.main([str(tmp_path / "checkpoint.pth"), "--nb_knn", "5", "--num_workers", "0"]) == 0
    assert "5-NN classifier result: Top1:" in capsys.readouterr().out


def test_a_run_stopped_and_resumed_on_cuda_reaches_the_teacher_of_a_straight_run(folder, tmp_path):
    train.main(train.get_args(tiny_args(folder, tmp_path / "straight")))
    train.main(train.get_args(tiny_args(folder, tmp_path / "resumed", "--stop_after_epoch", "0")))
    train.main(train.get_args(tiny_args(folder, tmp_path / "resumed")))
    straight, resumed = (torch.load(tmp_path / d / "checkpoint.pth", map_location="cpu", weights_only=False)
                         for d in ("straight", "resumed"))
    assert resumed["history"][0]["epoch"] == 0 and len(resumed["history"]) == 2
    for k, v in straight["teacher"].items():  # the same kernels in the same order; atomics may reorder sums
        torch.testing.assert_close(resumed["teacher"][k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_benchmark_on_cuda_times_both_steps_with_their_precision_peak_and_memory(capsys):
    res = benchmark.main(benchmark.get_args(["--arch", "vit_tiny", "--depth", "2", "--out_dim", "4096",
                                             "--batch_size", "8", "--steps", "3", "--warmup", "1",
                                             "--baseline_steps", "2", "--no_aug", "--no_cpu_preset"]))
    assert res["device"].startswith("cuda") and res["baseline_precision"] == "fp16"  # main_dino.py on GPUs
    assert res["precision"] == train.resolve_precision("auto", CUDA)
    for k in ("mfu", "baseline_mfu"):
        assert 0 < res[k] < 1, (k, res[k])
    assert res["peak_mem_mb"] > 0 and res["baseline_peak_mem_mb"] > 0 and res["img_per_s"] > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["device_name"] == torch.cuda.get_device_name()
