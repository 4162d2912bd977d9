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
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" RESILIENT_CUDA=ON
export CUDACXX="${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
start=$(date +%s)
step() { echo "== $* ($(( $(date +%s) - start )) s)" | tee -a "$OUT/env.txt"; }

step env
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  "$CUDACXX" --version 2>&1 | tail -2
  cmake --version 2>&1 | head -1
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'torch sees no GPU')" 2>&1
  df -h /dev/shm 2>&1 | tail -1
  nproc
} >>"$OUT/env.txt" 2>&1

# A tmpfs large enough for 2 x 4 GB slots plus the tests, if /dev/shm is small (VMs often give 64 MB).
shm_avail=$(df -k --output=avail /dev/shm 2>/dev/null | tail -1 | tr -d ' ')
if [ -z "$shm_avail" ] || [ "$shm_avail" -lt $((16 * 1024 * 1024)) ]; then
  mkdir -p /tmp/resilient-shm
  if mount -t tmpfs -o size=24g tmpfs /tmp/resilient-shm 2>>"$OUT/env.txt"; then
    export RESILIENT_SHM_DIR=/tmp/resilient-shm
    echo "using tmpfs $RESILIENT_SHM_DIR (24g) for segments" >>"$OUT/env.txt"
  fi
fi
SHM="${RESILIENT_SHM_DIR:-/dev/shm}"

[ -f README.md ] || printf '# resilient\n' > README.md   # the package metadata names a readme
step build
if ! timeout 240 "$PY" -m pip install --no-build-isolation --no-deps . >"$OUT/build.full" 2>&1; then
  tail -80 "$OUT/build.full" >"$OUT/build.log"
  echo "BUILD FAILED (see build.log)" | tee -a "$OUT/env.txt"
  exit 1
fi
tail -30 "$OUT/build.full" >"$OUT/build.log"; rm -f "$OUT/build.full"
# tests and bench import the source tree: put the installed extension beside it
so=$(cd / && "$PY" -c "import resilient._native as m; print(m.__file__)")
cp "$so" resilient/
"$PY" -c "import resilient._native as n; print('native cuda compiled', n.cuda_compiled(), 'available', n.cuda_available(), n.cuda_status())" >>"$OUT/env.txt" 2>&1

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
