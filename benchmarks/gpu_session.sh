#!/usr/bin/env bash
# One GPU session's checks, run on the lent GPU machine from the repository root:
#   the selftest record (GPU tests, sanitizers, kernel timings, FastMNIST epoch), then
#   MnistCNN epochs at batch 64 and 512 on the CUDA backend (throughput baseline for issue 6),
#   and with LOCALIZE_EPOCHS=N the digit-localization recipe on the GPU.
# Usage: PYCNN_COMMIT=<sha> PYCNN_DATA=<mnist dir> OUT=<dir> [SKIP_MNISTCNN=1] [LOCALIZE_EPOCHS=N] \
#        bash benchmarks/gpu_session.sh
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
stamp=$(date -u +%Y%m%d)
sha8=${PYCNN_COMMIT:0:8}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout 330 python3 -m pycnn.selftest --gpu --out "$OUT/gpu-$stamp-$sha8.json" 2>&1 | tee "$OUT/selftest.log" | tail -60
batches="64 512"
[ -n "${SKIP_MNISTCNN:-}" ] && batches=""
for b in $batches; do
  timeout 90 python3 -m pycnn train mnist --model mnistcnn --epochs 1 --batch-size "$b" --backend cuda \
    --no-progress --out "$OUT/mnistcnn-b$b" 2>&1 | tail -3
done
cp "$OUT"/mnistcnn-b64/metrics.json "$OUT/mnistcnn-b64.json" 2>/dev/null
cp "$OUT"/mnistcnn-b512/metrics.json "$OUT/mnistcnn-b512.json" 2>/dev/null
rm -rf "$OUT"/mnistcnn-b64 "$OUT"/mnistcnn-b512
if [ -n "${LOCALIZE_EPOCHS:-}" ]; then
  timeout "${LOCALIZE_TIMEOUT:-300}" python3 -m pycnn train localize --backend cuda --epochs "$LOCALIZE_EPOCHS" \
    --no-progress --out "$OUT/localize" 2>&1 | tail -25
  cp "$OUT/localize/metrics.json" "$OUT/localize-metrics.json" 2>/dev/null
  rm -rf "$OUT/localize"
fi
ls -la "$OUT"
