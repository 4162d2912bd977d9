#!/usr/bin/env bash
# Prepared device check of the overlapped CUDA snapshot (issue 4, "Snapshot stall"), for a lent GPU machine
# (H100/H200 image: python3 with torch, nvcc, cmake, ninja, scikit-build-core, pybind11; no network).
# Run from the repository root:  bash bench/gpu_snapshot_check.sh   (writes everything under $OUT; < 4 min)
#   env.txt       GPU, driver, nvcc, torch, /dev/shm, native module status, step times and exit codes
#   build.log     pip install with RESILIENT_CUDA=ON for sm_90 (tail)
#   pytest.txt    tests/store/test_gpu.py + tests/elastic/test_gpu_overlap.py + the CUDA persist round trip
#   stall.jsonl   bench/snapshot_stall.py --device cuda --reps 3 at 100 MB, 1 GB, 4 GB
#                 (stall_s overlapped, stall_behind_queued_s the same behind ~100 ms of queued GPU work,
#                 copy_s synchronous snapshot, memcpy_s pinned D2H copy_)
#   stall_profile.txt  cProfile of the 1 GB configuration (CPU-side cost of the overlapped snapshot)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/resilient-gpu-snapshot-check}"
source bench/gpu_common.sh
gpu_begin
export CMAKE_ARGS="${CMAKE_ARGS:--DCMAKE_CUDA_ARCHITECTURES=90-real}"  # H100/H200 only: one arch builds fast

step env
gpu_report_env
gpu_ensure_shm 12 20   # 2 x 4 GB slots plus headroom, if /dev/shm is small (VMs often give 64 MB)
step build
gpu_build 150 || exit 1

step pytest
OMP_NUM_THREADS=1 timeout 90 "$PY" -m pytest tests/store/test_gpu.py tests/elastic/test_gpu_overlap.py -q -rs \
  -p no:cacheprovider >"$OUT/pytest.txt" 2>&1
echo "pytest exit $?" >>"$OUT/env.txt"
# apart: its module needs hypothesis and safetensors, which the image may lack (a collection error there must
# not stop the tests above)
OMP_NUM_THREADS=1 timeout 60 "$PY" -m pytest tests/persist/test_persist_roundtrip.py -k cuda -q -rs \
  -p no:cacheprovider >>"$OUT/pytest.txt" 2>&1
echo "pytest (CUDA persist) exit $?" >>"$OUT/env.txt"

step bench
timeout 100 "$PY" bench/snapshot_stall.py --device cuda --reps 3 --sizes-mb 100,1000,4000 >"$OUT/stall.jsonl" 2>&1
echo "bench exit $?" >>"$OUT/env.txt"

# Where the remaining blocking time of the overlapped snapshot goes (2-5 ms per GB on an H100 on 2026-11-27,
# most of it the per-tensor CRC launch): the CPU side of one 1 GB configuration under cProfile, hottest first.
step profile
timeout 60 "$PY" -m cProfile -o "$OUT/stall_1g.prof" bench/snapshot_stall.py --device cuda --reps 5 \
  --sizes-mb 1000 >"$OUT/stall_profiled.jsonl" 2>&1
"$PY" -c "import pstats, sys; s = pstats.Stats(sys.argv[1]); s.sort_stats('cumulative').print_stats('resilient', 40); s.sort_stats('tottime').print_stats(25)" \
  "$OUT/stall_1g.prof" >"$OUT/stall_profile.txt" 2>&1
echo "profile exit $?" >>"$OUT/env.txt"
step done
