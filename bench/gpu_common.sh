# Shared by the prepared GPU checks (bench/gpu_check.sh, bench/gpu_snapshot_check.sh,
# bench/gpu_elastic_check.sh); sourced, not run.
# The caller sets OUT (results directory) and may set PYTHON; everything is logged under $OUT.
#   gpu_begin                  results directory, clock, CUDA build settings
#   step NAME                  a timestamped step line in $OUT/env.txt and on the console
#   gpu_report_env             GPU, driver, nvcc, cmake, python/torch, /dev/shm, cores -> env.txt
#   gpu_ensure_shm NEED_GB SIZE_GB   mount a SIZE_GB tmpfs for segments when /dev/shm has < NEED_GB free
#   gpu_build TIMEOUT_S        pip install . with RESILIENT_CUDA=ON, the extension copied beside the sources
#                              (tests and benchmarks import the source tree); returns 1 when the build fails

gpu_begin() {
  mkdir -p "$OUT"
  PY="${PYTHON:-python3}"
  export CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" RESILIENT_CUDA=ON
  export CUDACXX="${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
  start=$(date +%s)
}

step() { echo "== $* ($(( $(date +%s) - start )) s)" | tee -a "$OUT/env.txt"; }

gpu_report_env() {
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    "$CUDACXX" --version 2>&1 | tail -2
    cmake --version 2>&1 | head -1
    "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'torch sees no GPU')" 2>&1
    df -h /dev/shm 2>&1 | tail -1
    nproc
  } >>"$OUT/env.txt" 2>&1
}

gpu_ensure_shm() {
  local need_gb=$1 size_gb=$2 avail
  avail=$(df -k --output=avail /dev/shm 2>/dev/null | tail -1 | tr -d ' ')
  if [ -z "$avail" ] || [ "$avail" -lt $((need_gb * 1024 * 1024)) ]; then
    mkdir -p /tmp/resilient-shm
    if mount -t tmpfs -o "size=${size_gb}g" tmpfs /tmp/resilient-shm 2>>"$OUT/env.txt"; then
      export RESILIENT_SHM_DIR=/tmp/resilient-shm
      echo "using tmpfs $RESILIENT_SHM_DIR (${size_gb}g) for segments" >>"$OUT/env.txt"
    fi
  fi
  SHM="${RESILIENT_SHM_DIR:-/dev/shm}"
}

gpu_build() {
  local limit=$1 so
  [ -f README.md ] || printf '# resilient\n' > README.md   # the package metadata names a readme
  if ! timeout "$limit" "$PY" -m pip install --no-build-isolation --no-deps . >"$OUT/build.full" 2>&1; then
    tail -80 "$OUT/build.full" >"$OUT/build.log"
    echo "BUILD FAILED (see build.log)" | tee -a "$OUT/env.txt"
    return 1
  fi
  tail -30 "$OUT/build.full" >"$OUT/build.log"; rm -f "$OUT/build.full"
  so=$(cd / && "$PY" -c "import resilient._native as m; print(m.__file__)")
  cp "$so" resilient/
  "$PY" -c "import resilient._native as n; print('native cuda compiled', n.cuda_compiled(), 'available', n.cuda_available(), n.cuda_status(), 'async crc', hasattr(n, 'crc32c_device_async'))" >>"$OUT/env.txt" 2>&1
}
