#!/usr/bin/env bash
# The one prepared device check of the native shard store, for a lent GPU machine (H100/H200 image
# 'cuda': python3 with torch, nvcc, cmake, ninja, scikit-build-core, pybind11; no network).
# Run from the repository root:  bash bench/gpu_check.sh   (writes everything under $OUT; ~4-6 min)
#   env.txt       GPU, driver, nvcc, torch, /dev/shm, native module status
#   build.log     pip install with RESILIENT_CUDA=ON (tail)
#   pytest.txt    python -m pytest tests/store (GPU tests included)
#   bench.jsonl   bench/native_store.py --gpu (64 MB..1 GB: write/read/transfer + d2h/gpu_write)
#   bench_4g.jsonl  the GPU figures at 4 GB
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/resilient-gpu-check}"
source bench/gpu_common.sh
gpu_begin

step env
gpu_report_env
gpu_ensure_shm 16 24   # 2 x 4 GB slots plus the tests, if /dev/shm is small (VMs often give 64 MB)
step build
gpu_build 240 || exit 1

step pytest
OMP_NUM_THREADS=1 timeout 200 "$PY" -m pytest tests/store -q -rs -p no:cacheprovider >"$OUT/pytest.txt" 2>&1
echo "pytest exit $?" >>"$OUT/env.txt"

step bench
timeout 120 "$PY" bench/native_store.py --gpu --shm-dir "$SHM" >"$OUT/bench.jsonl" 2>&1
echo "bench exit $?" >>"$OUT/env.txt"
step bench-4g
timeout 90 "$PY" bench/native_store.py --gpu --skip-host --sizes 4294967296 --shm-dir "$SHM" >"$OUT/bench_4g.jsonl" 2>&1
echo "bench 4g exit $?" >>"$OUT/env.txt"
step done
