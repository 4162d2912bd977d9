"""Native CRC32C and copy engine against the pure-Python twin (the reference)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient.store import _loader, _pynative

native = _loader.backend() if _loader.is_native() else None
needs_native = pytest.mark.skipif(native is None, reason="resilient._native is not built")


def addr(a: np.ndarray) -> int:
    return a.ctypes.data


@pytest.mark.parametrize("engine_mod", [_pynative, native] if native else [_pynative], ids=lambda m: m.__name__)
def test_known_answers(engine_mod):
    assert engine_mod.crc32c(b"123456789") == 0xE3069283
    assert engine_mod.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4
    assert engine_mod.crc32c(b"") == 0


@needs_native
@pytest.mark.parametrize("n", [0, 1, 7, 63, 64, 255, 4095, 4096, 4097, 24577, 100003, (1 << 20) + 13])
def test_native_crc_equals_twin(n):
    data = os.urandom(n)
    assert native.crc32c(data) == _pynative.crc32c(data)
    assert native.crc32c(data, 0xDEADBEEF) == _pynative.crc32c(data, 0xDEADBEEF)


@needs_native
@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=5000), st.integers(0, 5000), st.integers(0, 2**32 - 1))
def test_combine_and_continue_match(data, cut, seed):
    cut = min(cut, len(data))
    a, b = data[:cut], data[cut:]
    whole = native.crc32c(data, seed)
    assert native.crc32c(b, native.crc32c(a, seed)) == whole
    assert native.crc32c_combine(native.crc32c(a, seed), native.crc32c(b), len(b)) == whole
    assert _pynative.crc32c_combine(_pynative.crc32c(a, seed), _pynative.crc32c(b), len(b)) == whole


@needs_native
def test_software_path_matches_hardware():
    data = os.urandom(300_001)
    hw = native.crc32c(data)
    previous = native.crc32c_force_software(True)
    try:
        assert native.crc32c(data) == hw
    finally:
        native.crc32c_force_software(previous)


@needs_native
@pytest.mark.parametrize("chunk", [4096, 65536, 1 << 20])
def test_batch_copy_checksum_matches_twin(chunk):
    rng = np.random.default_rng(chunk)
    sizes = [0, 1, chunk - 1, chunk, chunk + 1, 3 * chunk + 17, 200_003]
    srcs = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    dst_native = [np.zeros(n, dtype=np.uint8) for n in sizes]
    dst_twin = [np.zeros(n, dtype=np.uint8) for n in sizes]
    got = native.copy_checksum_batch([addr(d) for d in dst_native], [addr(s) for s in srcs], sizes, chunk)
    ref = _pynative.copy_checksum_batch([addr(d) for d in dst_twin], [addr(s) for s in srcs], sizes, chunk)
    assert list(got) == list(ref)
    assert len(ref) == sum(-(-n // chunk) for n in sizes)
    for s, a, b in zip(srcs, dst_native, dst_twin):
        assert np.array_equal(s, a) and np.array_equal(s, b)
    assert list(native.checksum_batch([addr(s) for s in srcs], sizes, chunk)) == list(ref)
    assert list(_pynative.checksum_batch([addr(s) for s in srcs], sizes, chunk)) == list(ref)


@needs_native
def test_copy_batch_copies_in_both_engines():
    src = np.random.default_rng(5).integers(0, 256, 3_000_017, dtype=np.uint8)
    for mod in (native, _pynative):
        dst = np.zeros_like(src)
        mod.copy_batch([addr(dst)], [addr(src)], [src.nbytes])
        assert np.array_equal(dst, src)


def test_bad_arguments_are_refused():
    mods = [_pynative] + ([native] if native else [])
    for mod in mods:
        with pytest.raises(ValueError):
            mod.checksum_batch([1, 2], [3], 4096)
        with pytest.raises(ValueError):
            mod.checksum_batch([0], [10], 0)


@needs_native
def test_cuda_calls_report_no_device_cleanly():
    if native.cuda_available():
        pytest.skip("a CUDA device is present")
    assert isinstance(native.cuda_status(), str) and native.cuda_status()
    with pytest.raises(RuntimeError, match="no CUDA device"):
        native.stream_create()
    with pytest.raises(RuntimeError, match="no CUDA device"):
        native.crc32c_device(0, 16, 4)
