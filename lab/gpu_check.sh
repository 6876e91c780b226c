#!/usr/bin/env bash
# The CUDA path checked in one command on a machine with a GPU, in under 10 minutes: the device, the CUDA tests
# (python -m pytest -m gpu: tests/test_gpu.py), then benchmark.py at full size (ours against the official step).
#
#     bash lab/gpu_check.sh        # files under $OUT if it is set, else under runs/gpu_check/
#     BENCHMARK_FLAGS="--arch vit_tiny --depth 2 --out_dim 4096 --no_aug --no_cpu_preset" bash lab/gpu_check.sh  # small
#
# What it writes: gpu_check.txt (everything, in order), one NAME.txt per step, benchmark.json (the benchmark's JSON
# line) and summary.txt (the figures in one dated line naming the GPU). Every step has its own time limit, so the
# whole stays under 10 minutes; a step that fails or runs out of time is recorded and the next one still runs. The
# exit code is the first failing step's (124: out of time), 0 if all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python}
dest=${OUT:-runs/gpu_check}
mkdir -p "$dest"
log="$dest/gpu_check.txt"
: > "$log"
status=0

step() {  # step NAME SECONDS COMMAND...: run COMMAND with a time limit; its output to the screen, NAME.txt and the log
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "=== $name (limit ${limit} s): $*" | tee -a "$log"
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$dest/$name.txt" | tee -a "$log"
    rc=${PIPESTATUS[0]}
    echo "=== $name: exit code $rc after $((SECONDS - t0)) s" | tee -a "$log"
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
        status=$rc
    fi
}

echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null \
    || echo '(not a git checkout)')" | tee -a "$log"
step nvidia-smi 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
step torch 60 "$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN', \
torch.backends.cudnn.version(), 'available', torch.cuda.is_available(), \
torch.cuda.get_device_name() if torch.cuda.is_available() else '(no GPU: the gpu tests will be skipped)')"
step pytest_gpu 300 "$PYTHON" -m pytest -m gpu -v -rs --durations=0
step benchmark 240 "$PYTHON" benchmark.py ${BENCHMARK_FLAGS:---no_aug}
grep '^{' "$dest/benchmark.txt" | tail -n 1 > "$dest/benchmark.json"
"$PYTHON" - "$dest/benchmark.json" "$dest/pytest_gpu.txt" <<'EOF' | tee "$dest/summary.txt" | tee -a "$log"
"""One dated line of what was measured: the GPU, the gpu tests' outcome, ours against the official step."""
import datetime, json, re, sys
tests = open(sys.argv[2]).read().strip().splitlines()
outcome = next((line.strip("= ") for line in reversed(tests) if re.search(r"\d+ (passed|failed|skipped)", line)),
               "no pytest summary")
try:
    r = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    sys.exit(print(f"{datetime.date.today()}: pytest -m gpu: {outcome}; benchmark: no JSON line (see benchmark.txt)"))
mb = lambda key: f"{r[key] / 1024:.2f} GB"
print(f"{datetime.date.today()}, {r['device_name']}, torch {__import__('torch').__version__}: pytest -m gpu: "
      f"{outcome}. {r['arch']}/{r['patch']}, {r['batch_size']} images x (2x{r['global_size']} + "
      f"{r['local_crops_number']}x{r['local_size']}), K {r['out_dim']}: ours ({r['precision']}) {r['img_per_s']:.0f} "
      f"img/s, MFU {r['mfu']:.2f} of {r['matmul_peak_gflops'] / 1e3:.3g} TFLOP/s, peak memory {mb('peak_mem_mb')}; "
      f"official as shipped ({r.get('baseline_precision', '-')}) {r.get('baseline_img_per_s', 0):.0f} img/s, MFU "
      f"{r.get('baseline_mfu', 0):.2f}, {mb('baseline_peak_mem_mb') if 'baseline_peak_mem_mb' in r else '-'}; "
      f"ours {r.get('speedup', 0):.2f}x faster." + (f" The cpu preset's step: ours {r['cpu_preset_img_per_s']:.0f} "
      f"img/s, official {r.get('cpu_preset_baseline_img_per_s', 0):.0f} img/s; with the speed levers "
      f"{r['cpu_levers_img_per_s']:.0f} img/s." if "cpu_preset_img_per_s" in r else ""))
EOF
echo "gpu_check: exit code $status; files in $dest" | tee -a "$log"
exit "$status"
