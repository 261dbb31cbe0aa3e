#!/usr/bin/env bash
# One GPU session's checks, run on the lent GPU machine from the repository root:
#   PART=1: the selftest record (GPU tests with the sanitizers beside them, kernel timings, a
#           FastMNIST epoch);
#   PART=2: the kernel ladder vs cuDNN (benchmarks/gpu_kernels.py), the training-throughput
#           benchmark vs PyTorch eager / PyTorch CUDA graph (benchmarks/gpu_training.py), v3-v5 with
#           the single-stage main loop on the compute-bound layer (PYCNN_CONV_STAGES=1), then, with
#           the time left, MnistCNN epochs at batch 64 and 512 through the CLI, eager and with the
#           step in a CUDA graph, and with LOCALIZE_EPOCHS=N the digit-localization recipe;
#   no PART: both, in that order.
# Steps run in order of importance under one deadline, DEADLINE_S seconds from the start of the
# script (default 560: a device call may run 600 s). Each step's timeout is the smaller of its
# own cap and the time left; a step with less than 30 s left is skipped and says so. Every
# benchmark writes its record as it goes, so a step cut short keeps what it measured.
# NCU=1 adds, after the training benchmark, Nsight Compute over one eager MnistCNN step at batch 64
# and 512 (benchmarks/gpu_ncu_step.py: speed of light, occupancy, launch stats and warp stall
# reasons of every kernel, CSV files ncu-mnistcnn-b64.csv / -b512.csv); files come back 8 at most,
# so pair it with SKIP_MNISTCNN=1. NCU_MEM=1 adds the memory workload sections (shared-memory
# wavefronts and bank conflicts, global requests and sectors through L1, per operation: what fills
# the v3 GEMMs' L1 throughput; benchmarks/ncu_summary.py prints them).
# SELFTEST_ARGS=--tests-only keeps the selftest to the tests and sanitizers when PART=2 follows in
# the same call (its kernel timings and FastMNIST epoch repeat what gpu_kernels.py and
# gpu_training.py measure).
# Device time is scarce (15 minutes a session, machine start included): set DEADLINE_S from the
# device tool's budget_left_s, e.g. PART=1 DEADLINE_S=330 then PART=2 DEADLINE_S=<what is left>,
# or a first call with the tests, ladder, training and WIDE=1, then a second one with
# PART=2 SKIP_LADDER=1 SKIP_TRAINING_BENCH=1 NCU=1 for Nsight Compute alone.
# Usage: PYCNN_COMMIT=<sha> PYCNN_DATA=<mnist dir> OUT=<dir> [PART=1|2] [DEADLINE_S=560] \
#        [SELFTEST_ARGS=--tests-only] [SKIP_STAGES1=1] [SKIP_MNISTCNN=1] [SKIP_TRAINING_BENCH=1] [NCU=1 [NCU_MEM=1]] [WIDE=1]
#        [KNOCKOUT=1] [LAYOUT=1] [THREADS=1] [LEAN=1] [NHWC=1] [SKIP_LADDER=1] [SKIP_HOST_COSTS=1]
#        [TRAINING_VARIANTS=pycnn-cudagraph,pycnn-cudagraph-optins,...]
#        [LOCALIZE_EPOCHS=N] bash benchmarks/gpu_session.sh
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
stamp=$(date -u +%Y%m%d)
sha8=${PYCNN_COMMIT:0:8}
deadline=${DEADLINE_S:-560}
part=${PART:-all}

# step NAME CAP COMMAND...: run COMMAND with timeout min(CAP, time left - 10 s), or skip it
step() {
  local name=$1 want=$2
  shift 2
  local left=$((deadline - SECONDS - 10))
  [ "$left" -lt "$want" ] && want=$left
  if [ "$want" -lt 30 ]; then
    echo "== skipped: $name ($((deadline - SECONDS)) s left of DEADLINE_S=$deadline)"
    return 0
  fi
  echo "== $name (timeout $want s, at $SECONDS s)"
  timeout "$want" "$@"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if [ "$part" != 2 ]; then
  step "selftest" 420 python3 -m pycnn.selftest --gpu ${SELFTEST_ARGS:-} --out "$OUT/gpu-$stamp-$sha8.json" 2>&1 | tee "$OUT/selftest.log" | tail -60
fi
[ "$part" = 1 ] && { ls -la "$OUT"; exit 0; }
# (gpu_kernels.py writes its record at the end: its own budget stops new layers in time for that)
kbudget=$(( deadline - SECONDS - 60 < 100 ? deadline - SECONDS - 60 : 100 ))
# (3n, 4n: v3's and v4's channels-last kernels beside them, opt-in until timed; 4n has a docs row;
# 3c: v3's backward-data as a 1x1 GEMM of dy and a fold, opt-in until timed; 3px: v3's weight
# gradient with B copied by 4 pixels x 8 columns per warp, opt-in until timed)
[ -z "${SKIP_LADDER:-}" ] && step "kernel ladder vs cuDNN" 150 python3 benchmarks/gpu_kernels.py --budget "$kbudget" \
  --versions 1,2,3,3c,3n,3px,4,4n,5 --json "$OUT/gpu-$stamp-$sha8-kernels.json" 2>&1 | tail -80
# (TRAINING_VARIANTS=a,b,...: only those pycnn MnistCNN variants, for a short session)
tv=""; [ -n "${TRAINING_VARIANTS:-}" ] && tv="--variants=$TRAINING_VARIANTS"  # (no spaces in it: unquoted below)
[ -z "${SKIP_TRAINING_BENCH:-}" ] && step "training throughput vs PyTorch" 240 \
  python3 benchmarks/gpu_training.py --out "$OUT/training.json" $tv 2>&1 | tail -70
# Where the host's share of a small layer's call goes (CuPy's allocation, device context and launch
# from Python, pycnn's own work, cProfile of two conv calls): issue 6's per-call comparisons.
[ -z "${SKIP_HOST_COSTS:-}" ] && step "host costs of a call (real CuPy)" 60 \
  python3 benchmarks/host_overhead.py --gpu --json "$OUT/host-costs.json" 2>&1 | tail -50
if [ -n "${NCU:-}" ]; then
  ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  for b in 64 512; do
    if [ -z "$ncu_bin" ]; then echo "== skipped: ncu (not found)"; break; fi
    step "ncu: one MnistCNN step at batch $b" 120 "$ncu_bin" --clock-control none --profile-from-start off \
      --csv --page raw --section SpeedOfLight --section Occupancy --section LaunchStats \
      --section WarpStateStats ${NCU_MEM:+--section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables} \
      --log-file "$OUT/ncu-mnistcnn-b$b.csv" \
      python3 benchmarks/gpu_ncu_step.py --model mnistcnn --batch "$b" 2>&1 | tail -5
  done
fi
# WIDE=1: v3 on the model layers with the default tiles and with PYCNN_CONV3_WIDE=1 (32x256 /
# 64x128 tiles for the forward and backward-data GEMMs; the default takes them where 264 or
# more of them fill the GPU), the
# stride-1 backward-data as the forward GEMM of the flipped filters (v3f,
# PYCNN_CONV_BWD_DATA_FLIP=1), the split-K rule before "waves" (v3fill), and split-K with rounds
# of 264 and 1056 blocks instead of 528 (v3@T), side by side, at batch 64 (with the
# compute-bound layer) and at batch 512 (where MnistCNN conv2's backward-data took 398 us).
if [ -n "${WIDE:-}" ]; then
  for b in 64 512; do
    layers=models; [ "$b" = 64 ] && layers=all
    step "v3 default vs wide tiles vs flipped backward-data vs split targets, $layers layers at batch $b" 80 \
      python3 benchmarks/gpu_kernels.py --layers "$layers" --versions 3,3w,3f,3fill,3@264,3@1056 --batch "$b" \
      --repeats 10 --budget 50 --json "$OUT/gpu-$stamp-$sha8-kernels-wide-b$b.json" 2>&1 | tail -60
  done
fi
# KNOCKOUT=1: where v3's time goes without a profiler: v3 on the compute-bound layer and MnistCNN's
# layers at batch 512, then recompiled with the products, the B-tile copies, the A-tile copies or
# the index decode left out (PYCNN_CONV3_KNOCKOUT=1/2/4/8; the results are wrong, the times are
# the point): each difference to v3 is what that part costs; and with two tiles in flight
# (PYCNN_CONV_STAGES=3, "rebuilt" entries). Five NVRTC compiles of the GEMM-core files (conv2d_igemm*.cu, _narrow, _winograd).
[ -n "${KNOCKOUT:-}" ] && step "v3 knockouts and 3-stage loop (compute-bound + MnistCNN layers at batch 512)" 130 \
  python3 benchmarks/gpu_kernels.py --layers all --models mnistcnn --versions 3 --knockouts 1,2,4,8 --also-stages 3 \
  --batch 512 --repeats 10 --budget 60 --json "$OUT/gpu-$stamp-$sha8-kernels-knockouts.json" 2>&1 | tail -40
# LAYOUT=1: v3 with its warps on 16 x 2 register tiles (the default) and rebuilt with 8 x 4
# (PYCNN_CONV3_WARP_COLS=8), on every model layer at batch 64 and on the
# compute-bound layer and MnistCNN's layers at batch 512. Two NVRTC compiles of the GEMM-core files each.
if [ -n "${LAYOUT:-}" ]; then
  step "v3 warp layouts 16 x 2 vs 8 x 4, model layers at batch 64" 70 \
    python3 benchmarks/gpu_kernels.py --layers models --versions 3 --also-warp-cols 8 --batch 64 \
    --repeats 10 --budget 40 --json "$OUT/gpu-$stamp-$sha8-kernels-layout-b64.json" 2>&1 | tail -40
  step "v3 warp layouts 16 x 2 vs 8 x 4, compute-bound + MnistCNN layers at batch 512" 70 \
    python3 benchmarks/gpu_kernels.py --layers all --models mnistcnn --versions 3 --also-warp-cols 8 --batch 512 \
    --repeats 10 --budget 40 --json "$OUT/gpu-$stamp-$sha8-kernels-layout-b512.json" 2>&1 | tail -40
fi
# THREADS=1: v3 with its 64x128 tiles run by 128 threads with 8x8 register tiles (the default)
# and by 256 threads with 4x8 (v3t, PYCNN_CONV3_R8=0), and its 32x256 tiles by 256 threads with
# 2x16 (the default) and by 128 with 4x16 (v3m, PYCNN_CONV3_M32T128=1), every model layer at
# batch 512 (a GEMM without such tiles is timed once).
[ -n "${THREADS:-}" ] && step "v3 wide tiles by 128 vs 256 threads, model layers at batch 512" 70 \
  python3 benchmarks/gpu_kernels.py --layers models --versions 3,3t,3m --batch 512 --repeats 10 --budget 40 \
  --json "$OUT/gpu-$stamp-$sha8-kernels-threads-b512.json" 2>&1 | tail -40
# LEAN=1: v3 as it is and rebuilt with PYCNN_CONV3_LEAN_GATHER=1 (the B-tile gather with fewer
# instructions per element, benchmarks/sass_mix.py; the same bits), on the compute-bound layer and
# every model layer at batch 512. Two NVRTC builds of the GEMM-core files.
[ -n "${LEAN:-}" ] && step "v3 default vs lean gather, compute-bound + model layers at batch 512" 100 \
  python3 benchmarks/gpu_kernels.py --layers all --versions 3 --also-lean --batch 512 --repeats 10 --budget 40 \
  --json "$OUT/gpu-$stamp-$sha8-kernels-lean-b512.json" 2>&1 | tail -40
# NHWC=1: v3 and v4 as they are and through their channels-last kernels (v3n, PYCNN_CONV3_NHWC=1;
# v4n, PYCNN_CONV4_NHWC=1: the input transposed to NHWC, 16-byte loads; v4 with ldmatrix) on the
# compute-bound layer and every model layer at batch 512 (where they apply; the others are timed
# once), and v3's col2im backward-data (v3c, PYCNN_CONV_BWD_DATA_COL2IM=1) beside them. The main
# ladder times 3c, 3n, 3px and 4n at batch 64 already; gpu_training.py's pycnn-cudagraph-nhwc,
# -col2im, -px and -optins run the MnistCNN step with them. (3px: the weight gradient by pixel lanes.)
[ -n "${NHWC:-}" ] && step "v3/v4 vs their channels-last kernels, col2im and px, compute-bound + model layers" 100 \
  python3 benchmarks/gpu_kernels.py --layers all --versions 3,3c,3n,3px,4,4n --batch 512 --repeats 10 --budget 50 \
  --json "$OUT/gpu-$stamp-$sha8-kernels-nhwc-b512.json" 2>&1 | tail -40
# The v3/v4/v5 GEMM main loop without cp.async double buffering, on the compute-bound layer: is
# the default (PYCNN_CONV3_STAGES=2) the faster one there?
[ -z "${SKIP_STAGES1:-}" ] && step "v3/v4/v5 with PYCNN_CONV_STAGES=1 (compute-bound layer)" 60 env PYCNN_CONV_STAGES=1 \
  python3 benchmarks/gpu_kernels.py --layers big --versions 3,4,5 --repeats 10 \
  --json "$OUT/gpu-$stamp-$sha8-kernels-stages1.json" 2>&1 | tail -12
batches="64 512"
[ -n "${SKIP_MNISTCNN:-}" ] && batches=""
for b in $batches; do
  for mode in eager graph; do
    flag=""; [ "$mode" = graph ] && flag="--cuda-graph"
    step "pycnn train mnist --model mnistcnn --batch-size $b ($mode)" 90 \
      python3 -m pycnn train mnist --model mnistcnn --epochs 1 --batch-size "$b" --backend cuda \
      $flag --no-progress --out "$OUT/run" 2>&1 | tail -3
    cp "$OUT/run/metrics.json" "$OUT/mnistcnn-b$b-$mode.json" 2>/dev/null
    rm -rf "$OUT/run"
  done
done
if [ -n "${LOCALIZE_EPOCHS:-}" ]; then
  step "pycnn train localize --epochs $LOCALIZE_EPOCHS" "${LOCALIZE_TIMEOUT:-300}" \
    python3 -m pycnn train localize --backend cuda --epochs "$LOCALIZE_EPOCHS" \
    --no-progress --out "$OUT/localize" 2>&1 | tail -25
  cp "$OUT/localize/metrics.json" "$OUT/localize-metrics.json" 2>/dev/null
  rm -rf "$OUT/localize"
fi
# One record in the DESIGN.md format: the selftest's tests + the ladder + the training figures.
if [ -f "$OUT/gpu-$stamp-$sha8.json" ]; then
  merge_args=()
  [ -f "$OUT/gpu-$stamp-$sha8-kernels.json" ] && merge_args+=(--kernels "$OUT/gpu-$stamp-$sha8-kernels.json")
  [ -f "$OUT/training.json" ] && merge_args+=(--training "$OUT/training.json")
  [ -f "$OUT/host-costs.json" ] && merge_args+=(--host-costs "$OUT/host-costs.json")
  python3 benchmarks/gpu_record.py --selftest "$OUT/gpu-$stamp-$sha8.json" "${merge_args[@]}" \
    --out "$OUT/gpu-$stamp-$sha8.json" && rm -f "$OUT/gpu-$stamp-$sha8-kernels.json" "$OUT/training.json" \
    "$OUT/host-costs.json"
fi
[ -f "$OUT/gpu-$stamp-$sha8.json" ] && python3 benchmarks/targets.py "$OUT/gpu-$stamp-$sha8.json" 2>&1 | head -70
echo "== done at $SECONDS s"
ls -la "$OUT"
