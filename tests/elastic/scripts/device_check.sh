#!/usr/bin/env bash
# Device check for the train-function API (run from the repo root on a GPU machine; writes to $OUT):
# builds resilient._native (CUDA when nvcc is there), checks that in-process recovery on CUDA (NCCL
# group aborted and re-formed, CUDA RNG restored) ends bitwise equal to the fault-free run, and runs
# bench/snapshot_stall.py on CPU and CUDA.
set -u
OUT=${OUT:-/tmp/device-check}; mkdir -p "$OUT"
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 CUBLAS_WORKSPACE_CONFIG=:4096:8 DETERMINISTIC=1
export RESILIENT_SHM_DIR=$(mktemp -d /dev/shm/resilient-devcheck-XXXX)
nvidia-smi -L; python -V; python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
which nvcc cmake ninja
if command -v cmake >/dev/null; then
  gen=""; command -v ninja >/dev/null && gen="-G Ninja"
  timeout 300 cmake -S native -B /tmp/nb -DCMAKE_BUILD_TYPE=Release $gen >"$OUT/cmake.log" 2>&1 \
    && timeout 300 cmake --build /tmp/nb -j 16 >>"$OUT/cmake.log" 2>&1 && cp /tmp/nb/_native*.so resilient/
  tail -3 "$OUT/cmake.log"
fi
python -c "from resilient.store import is_native, backend; print('native', is_native(), 'cuda', backend().cuda_available())"
for s in mlp_train transformer_train; do
  for regen in -1 7; do
    LOCAL_REGEN_AT=$regen STEPS=20 timeout 120 python tests/elastic/scripts/$s.py 2>"$OUT/$s.$regen.err" | tee -a "$OUT/hashes.txt"
    tail -2 "$OUT/$s.$regen.err"
  done
done
timeout 150 python bench/snapshot_stall.py --reps 3 | tee "$OUT/stall_cpu.jsonl"
timeout 200 python bench/snapshot_stall.py --reps 3 --device cuda --big | tee "$OUT/stall_cuda.jsonl"
rm -rf "$RESILIENT_SHM_DIR"
