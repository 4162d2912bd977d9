#!/usr/bin/env bash
# Prepared device check of the train-function API on CUDA (issue 4), for a lent GPU machine (one GPU: world
# size 1, since NCCL refuses two ranks on one device). In-process recovery on CUDA: the NCCL group is aborted
# and formed again, the CUDA RNG and the optimizer state come back from the snapshot, and the run must end
# bitwise equal to the fault-free one (deterministic algorithms on).
# Run from the repository root:  bash bench/gpu_elastic_check.sh   (writes everything under $OUT; < 2 min)
#   env.txt         GPU, build, and one line per script: the fault-free and recovered hashes, SAME or DIFFERENT
#   elastic.txt     pytest tests/elastic/test_modes.py -k single_process (the bitwise test, here on CUDA)
#   direct.txt      each direct run's output and the end of its log (RESILIENT_DEVICE=cuda: fails without a GPU;
#                   DEVICE=cpu runs the same on the CPU, to try the script)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/resilient-gpu-elastic-check}"
source bench/gpu_common.sh
gpu_begin
export CMAKE_ARGS="${CMAKE_ARGS:--DCMAKE_CUDA_ARCHITECTURES=90-real}"

step env
gpu_report_env
if ! "$PY" -c "import resilient._native" 2>/dev/null; then
  step build
  gpu_build 150 || exit 1
fi
export OMP_NUM_THREADS=1 DETERMINISTIC=1 CUBLAS_WORKSPACE_CONFIG=:4096:8

step pytest
timeout 240 "$PY" -m pytest tests/elastic/test_modes.py -k single_process -q -rs -p no:cacheprovider \
  >"$OUT/elastic.txt" 2>&1
echo "pytest exit $?" >>"$OUT/env.txt"

step direct
shm=$(mktemp -d /dev/shm/resilient-gpu-elastic-XXXX)
for s in mlp_train transformer_train; do
  for regen in -1 9; do
    RESILIENT_SHM_DIR=$shm RESILIENT_DEVICE=${DEVICE:-cuda} LOCAL_REGEN_AT=$regen STEPS=20 timeout 120 \
      "$PY" tests/elastic/scripts/$s.py >"$OUT/$s.$regen.out" 2>"$OUT/run.err"
    echo "$s regen=$regen exit $?" >>"$OUT/env.txt"
    { echo "== $s regen=$regen (device ${DEVICE:-cuda})"; tail -25 "$OUT/run.err"; } >>"$OUT/direct.txt"
  done
  rm -f "$OUT/run.err"
  clean=$(grep -o 'STATE_HASH [0-9a-f]*' "$OUT/$s.-1.out"); recovered=$(grep -o 'STATE_HASH [0-9a-f]*' "$OUT/$s.9.out")
  verdict=DIFFERENT; [ -n "$clean" ] && [ "$clean" = "$recovered" ] && verdict=SAME
  echo "$s: clean ${clean#STATE_HASH } recovered ${recovered#STATE_HASH } $verdict; $(grep -o 'restarts=[0-9]*' "$OUT/$s.9.out")" \
    | tee -a "$OUT/env.txt"
  cat "$OUT/$s.-1.out" "$OUT/$s.9.out" >>"$OUT/direct.txt"; rm -f "$OUT/$s.-1.out" "$OUT/$s.9.out"
done
rm -rf "$shm"
step done
