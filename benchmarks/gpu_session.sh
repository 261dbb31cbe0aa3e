#!/usr/bin/env bash
# One GPU session's checks, run on the lent GPU machine from the repository root:
#   the selftest record (GPU tests, sanitizers, kernel timings, FastMNIST epoch), then
#   MnistCNN epochs at batch 64 and 512 on the CUDA backend, eager and with the step in a CUDA graph,
#   the training-throughput benchmark vs PyTorch eager / PyTorch CUDA graph (benchmarks/gpu_training.py),
#   and with LOCALIZE_EPOCHS=N the digit-localization recipe on the GPU.
#   PART=1 runs only the selftest, PART=2 only the rest (the kernel ladder vs cuDNN, the training
#   runs and benchmarks), so each fits one device call (<= 600 s); no PART runs both.
# Usage: PYCNN_COMMIT=<sha> PYCNN_DATA=<mnist dir> OUT=<dir> [PART=1|2] [SKIP_MNISTCNN=1] [LOCALIZE_EPOCHS=N] \
#        bash benchmarks/gpu_session.sh
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
stamp=$(date -u +%Y%m%d)
sha8=${PYCNN_COMMIT:0:8}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
part=${PART:-all}
if [ "$part" != 2 ]; then
  timeout 420 python3 -m pycnn.selftest --gpu --out "$OUT/gpu-$stamp-$sha8.json" 2>&1 | tee "$OUT/selftest.log" | tail -60
fi
[ "$part" = 1 ] && { ls -la "$OUT"; exit 0; }
timeout 150 python3 benchmarks/gpu_kernels.py --json "$OUT/gpu-$stamp-$sha8-kernels.json" 2>&1 | tail -80
batches="64 512"
[ -n "${SKIP_MNISTCNN:-}" ] && batches=""
for b in $batches; do
  for mode in eager graph; do
    flag=""; [ "$mode" = graph ] && flag="--cuda-graph"
    timeout 90 python3 -m pycnn train mnist --model mnistcnn --epochs 1 --batch-size "$b" --backend cuda \
      $flag --no-progress --out "$OUT/run" 2>&1 | tail -3
    cp "$OUT/run/metrics.json" "$OUT/mnistcnn-b$b-$mode.json" 2>/dev/null
    rm -rf "$OUT/run"
  done
done
[ -z "${SKIP_TRAINING_BENCH:-}" ] && timeout 240 python3 benchmarks/gpu_training.py --out "$OUT/training.json" 2>&1 | tail -70
if [ -n "${LOCALIZE_EPOCHS:-}" ]; then
  timeout "${LOCALIZE_TIMEOUT:-300}" python3 -m pycnn train localize --backend cuda --epochs "$LOCALIZE_EPOCHS" \
    --no-progress --out "$OUT/localize" 2>&1 | tail -25
  cp "$OUT/localize/metrics.json" "$OUT/localize-metrics.json" 2>/dev/null
  rm -rf "$OUT/localize"
fi
ls -la "$OUT"
