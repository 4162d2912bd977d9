"""The native core's own C++ tests (native/tests/test_native.cpp: CRC32C against known answers and the
software path, the cached GF(2) operators the CUDA launch uses, the copy engine, the pool, sockets),
built with AddressSanitizer + UBSan by native/run_sanitizers.sh and run as a real binary."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("c++") is None,
                    reason="needs cmake and a C++ compiler to build the native tests")
def test_native_cpp_suite_passes_under_sanitizers(tmp_path):
    proc = subprocess.run(["bash", os.path.join(REPO, "native", "run_sanitizers.sh"), str(tmp_path / "build")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert "all native tests passed" in proc.stdout
