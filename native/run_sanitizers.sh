#!/usr/bin/env bash
# Build the native core and its C++ tests with AddressSanitizer + UndefinedBehaviorSanitizer and run
# them (CUDA off: the sanitizers cover the host code). Usage: native/run_sanitizers.sh [build-dir]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
build="${1:-${TMPDIR:-/tmp}/resilient-native-asan}"
flags="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined -g -O1"
cmake -S "$here" -B "$build" -DCMAKE_BUILD_TYPE=Debug -DRESILIENT_CUDA=OFF -DRESILIENT_TESTS=ON \
  -DRESILIENT_PYTHON=OFF -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" >/dev/null
cmake --build "$build" --target test_native -j "$(nproc)"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  "$build/test_native"
echo "sanitized native tests passed"
