#!/usr/bin/env bash
# The GPU checks of issue 16 in one short script (its timeouts add up to under 12 minutes; never run yet), for a session lent a GPU:
#   OUT=/some/folder bash tools/gpu_checks.sh
# Writes into $OUT (default docs/results/gpu): the device, the GPU tests' log, and the JSON of each benchmark.
# What each measures against its target (issue 16, "Measure"):
#   bench_data.py --models mlp --batch 64         MLP CIFAR10-shaped epoch (50,000 images): target <= 0.3 s
#   bench_data.py --models resnet18 --batch 128   ResNet18 (CIFAR stem) epoch: target <= 2.0 s
#   bench_implicit_head.py                         implicit ETF head against the linear head: target <= 1.05x
#   cluster dry-run papyan2020 paper               Papyan's grid in GPU hours: target >= 2x below 172 h
#                                                 (docs/results/dry_run_papyan2020_h100.txt, float32, host data)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.csv" 2>&1
$PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))" >> "$OUT/device.csv"
timeout 240 $PY -m pytest -q -x tests/test_gpu.py tests/test_device_data.py tests/test_implicit_head_ops.py \
    > "$OUT/gpu_tests.log" 2>&1; echo "gpu tests: rc $?"
timeout 120 $PY benchmarks/bench_data.py --device cuda --models mlp --batch 64 --json "$OUT/bench_data_mlp_b64.json"
timeout 120 $PY benchmarks/bench_data.py --device cuda --models resnet18 --batch 128 --json "$OUT/bench_data_resnet18.json"
timeout 90 $PY benchmarks/bench_implicit_head.py --json "$OUT/bench_implicit_head.json"
timeout 120 $PY -m nc_lib.cluster dry-run --paper papyan2020 --scale paper --device cuda --json "$OUT/dry_run_papyan2020.json" \
    > "$OUT/dry_run_papyan2020.txt" 2>&1; tail -1 "$OUT/dry_run_papyan2020.txt"
