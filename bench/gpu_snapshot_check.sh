#!/usr/bin/env bash
# Prepared device check of the overlapped CUDA snapshot (issue 4, "Snapshot stall"), for a lent GPU machine
# (H100/H200 image: python3 with torch, nvcc, cmake, ninja, scikit-build-core, pybind11; no network).
# Run from the repository root:  bash bench/gpu_snapshot_check.sh   (writes everything under $OUT; < 4 min)
#   env.txt       GPU, driver, nvcc, torch, /dev/shm, native module status, step times and exit codes
#   build.log     pip install with RESILIENT_CUDA=ON for sm_90 (tail)
#   pytest.txt    tests/store/test_gpu.py + tests/elastic/test_gpu_overlap.py
#   stall.jsonl   bench/snapshot_stall.py --device cuda --reps 3 at 100 MB, 1 GB, 4 GB
#                 (stall_s overlapped, copy_s synchronous snapshot, memcpy_s pinned D2H copy_)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/resilient-gpu-snapshot-check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" RESILIENT_CUDA=ON
export CMAKE_ARGS="${CMAKE_ARGS:--DCMAKE_CUDA_ARCHITECTURES=90-real}"  # H100/H200 only: one arch builds fast
export CUDACXX="${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
start=$(date +%s)
step() { echo "== $* ($(( $(date +%s) - start )) s)" | tee -a "$OUT/env.txt"; }

step env
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  "$CUDACXX" --version 2>&1 | tail -2
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'torch sees no GPU')" 2>&1
  df -h /dev/shm 2>&1 | tail -1
  nproc
} >>"$OUT/env.txt" 2>&1

# A tmpfs large enough for 2 x 4 GB slots plus headroom, if /dev/shm is small (VMs often give 64 MB).
shm_avail=$(df -k --output=avail /dev/shm 2>/dev/null | tail -1 | tr -d ' ')
if [ -z "$shm_avail" ] || [ "$shm_avail" -lt $((12 * 1024 * 1024)) ]; then
  mkdir -p /tmp/resilient-shm
  if mount -t tmpfs -o size=20g tmpfs /tmp/resilient-shm 2>>"$OUT/env.txt"; then
    export RESILIENT_SHM_DIR=/tmp/resilient-shm
    echo "using tmpfs $RESILIENT_SHM_DIR (20g) for segments" >>"$OUT/env.txt"
  fi
fi

[ -f README.md ] || printf '# resilient\n' > README.md   # the package metadata names a readme
step build
if ! timeout 150 "$PY" -m pip install --no-build-isolation --no-deps . >"$OUT/build.full" 2>&1; then
  tail -80 "$OUT/build.full" >"$OUT/build.log"
  echo "BUILD FAILED (see build.log)" | tee -a "$OUT/env.txt"
  exit 1
fi
tail -30 "$OUT/build.full" >"$OUT/build.log"; rm -f "$OUT/build.full"
# tests and bench import the source tree: put the installed extension beside it
so=$(cd / && "$PY" -c "import resilient._native as m; print(m.__file__)")
cp "$so" resilient/
"$PY" -c "import resilient._native as n; print('native cuda compiled', n.cuda_compiled(), 'available', n.cuda_available(), n.cuda_status(), 'async crc', hasattr(n, 'crc32c_device_async'))" >>"$OUT/env.txt" 2>&1

step pytest
OMP_NUM_THREADS=1 timeout 90 "$PY" -m pytest tests/store/test_gpu.py tests/elastic/test_gpu_overlap.py -q -rs \
  -p no:cacheprovider >"$OUT/pytest.txt" 2>&1
echo "pytest exit $?" >>"$OUT/env.txt"

step bench
timeout 100 "$PY" bench/snapshot_stall.py --device cuda --reps 3 --sizes-mb 100,1000,4000 >"$OUT/stall.jsonl" 2>&1
echo "bench exit $?" >>"$OUT/env.txt"
step done
