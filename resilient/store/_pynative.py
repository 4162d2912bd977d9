"""Pure-Python twin of ``resilient._native``: the same functions, signatures and results.

It serves when the extension is absent (or ``RESILIENT_NO_NATIVE=1``) and is the reference that tests
compare the native module against. CRC32C here is table-driven and vectorized with numpy: a buffer is
cut into many equal lanes whose raw CRCs are computed side by side, then combined pairwise with
"append n zero bytes" operators. Addresses are raw integers, as for the native module; memory at an
address is reached through ctypes. There is no CUDA here: every CUDA call raises "no CUDA device".

The native failpoints (``native.copy.after_data``, ``native.seal.before_flip``/``after_flip``,
``native.send.after_header``/``mid_stream``, ``native.recv.mid_stream``/``before_ack``) are marked at
the same places, through the Python registry (``resilient.failpoints``, the same ``$RESILIENT_FAILPOINTS``).
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
from functools import lru_cache

import numpy as np

from resilient import failpoints

VERSION = 1
_POLY = 0x82F63B78
_MASK = 0xFFFFFFFF
_LANE = 64  # bytes per lane in the vectorized CRC
_MIN_VECTOR = 4096  # below this many bytes the scalar loop is faster
_COPY_CHUNK = 4 << 20


def _make_table() -> np.ndarray:
    table = np.zeros(256, dtype=np.uint32)
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        table[n] = c
    return table


_TABLE = _make_table()
_TABLE_LIST = [int(x) for x in _TABLE]


def _advance_zeros(x: np.ndarray, nbytes: int) -> np.ndarray:
    for _ in range(nbytes):
        x = np.take(_TABLE, x & 0xFF) ^ (x >> 8)
    return x


def _apply(tab: np.ndarray, x: np.ndarray) -> np.ndarray:
    return (
        np.take(tab[0], x & 0xFF)
        ^ np.take(tab[1], (x >> 8) & 0xFF)
        ^ np.take(tab[2], (x >> 16) & 0xFF)
        ^ np.take(tab[3], x >> 24)
    )


@lru_cache(maxsize=64)
def _shift_table(nbytes: int) -> np.ndarray:
    """Table (4, 256) of the operator that advances a raw CRC state over ``nbytes`` zero bytes."""
    if nbytes <= _LANE:
        basis = (np.arange(256, dtype=np.uint32)[None, :] << (8 * np.arange(4, dtype=np.uint32))[:, None])
        return _advance_zeros(basis.astype(np.uint32), nbytes)
    half = _shift_table(nbytes // 2)
    basis = (np.arange(256, dtype=np.uint32)[None, :] << (8 * np.arange(4, dtype=np.uint32))[:, None])
    return _apply(half, _apply(half, basis.astype(np.uint32)))


def _raw_scalar(state: int, data) -> int:
    table = _TABLE_LIST
    for b in bytes(data):
        state = table[(state ^ b) & 0xFF] ^ (state >> 8)
    return state


def _raw(state: int, buf: np.ndarray) -> int:
    """Raw (unconditioned) CRC32C state after feeding ``buf`` (uint8 array) starting from ``state``."""
    n = buf.shape[0]
    pos = 0
    while n - pos >= _MIN_VECTOR:
        lanes = 1 << ((n - pos) // _LANE).bit_length() - 1
        block = buf[pos : pos + lanes * _LANE].reshape(lanes, _LANE)
        crc = np.zeros(lanes, dtype=np.uint32)
        crc[0] = state
        for j in range(_LANE):
            crc = np.take(_TABLE, (crc ^ block[:, j]) & 0xFF) ^ (crc >> 8)
        size = _LANE
        while crc.shape[0] > 1:
            crc = _apply(_shift_table(size), crc[0::2]) ^ crc[1::2]
            size *= 2
        state = int(crc[0])
        pos += lanes * _LANE
    return _raw_scalar(state, buf[pos:].tobytes())


def _view(addr: int, n: int) -> np.ndarray:
    if n == 0:
        return np.empty(0, dtype=np.uint8)
    if not addr:
        raise ValueError("null address for a non-empty region")
    return np.ctypeslib.as_array((ctypes.c_ubyte * n).from_address(addr))


def _as_u8(data) -> np.ndarray:
    return np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)


def crc32c(data, seed: int = 0) -> int:
    return _raw((seed ^ _MASK) & _MASK, _as_u8(data)) ^ _MASK


def crc32c_addr(addr: int, n: int, seed: int = 0) -> int:
    return _raw((seed ^ _MASK) & _MASK, _view(addr, n)) ^ _MASK


def _gf2_times(op: list[int], vec: int) -> int:
    total, i = 0, 0
    while vec:
        if vec & 1:
            total ^= op[i]
        vec >>= 1
        i += 1
    return total


def _zeros_op(nbytes: int) -> list[int]:
    one_bit = [_POLY] + [1 << (n - 1) for n in range(1, 32)]
    cur = one_bit
    for _ in range(3):  # 2, 4, 8 bits
        cur = [_gf2_times(cur, cur[n]) for n in range(32)]
    op = [1 << n for n in range(32)]
    while nbytes:
        if nbytes & 1:
            op = [_gf2_times(cur, op[n]) for n in range(32)]
        nbytes >>= 1
        if nbytes:
            cur = [_gf2_times(cur, cur[n]) for n in range(32)]
    return op


def crc32c_combine(crc_a: int, crc_b: int, len_b: int) -> int:
    return _gf2_times(_zeros_op(len_b), crc_a) ^ crc_b


def crc32c_hw_available() -> bool:
    return False


def crc32c_force_software(on: bool) -> bool:
    return True


def default_threads() -> int:
    return 1


def _check_lengths(dsts, srcs, sizes) -> None:
    if len(srcs) != len(sizes) or (dsts and len(dsts) != len(sizes)):
        raise ValueError("dsts, srcs and sizes must have the same length")


def _check_chunk(chunk: int) -> None:
    if chunk <= 0:
        raise ValueError("chunk must be a positive number of bytes")


def _chunk_crcs(view: np.ndarray, chunk: int) -> list[int]:
    return [_raw(_MASK, view[off : off + chunk]) ^ _MASK for off in range(0, view.shape[0], chunk)]


def copy_checksum_batch(dsts, srcs, sizes, chunk: int, threads: int = 0, stop_word: int = 0,
                        stop_above: int = 0) -> list[int] | None:
    """Copy each region and CRC it chunk by chunk; None when stopped: with ``stop_word`` (the address of an
    aligned int64), the int64 there is read before each chunk and once it exceeds ``stop_above`` the copy
    ends part-way (the destination then holds a partial copy)."""
    _check_chunk(chunk)
    _check_lengths(dsts, srcs, sizes)
    if stop_word & 7:
        raise ValueError("stop_word must be 8-byte aligned")
    word = ctypes.c_int64.from_address(stop_word) if stop_word else None
    out: list[int] = []
    for dst, src, n in zip(dsts, srcs, sizes):
        if not n:
            continue
        target, source = _view(dst, n), _view(src, n)
        if word is None:  # one copy and one vectorized CRC pass per region
            np.copyto(target, source)
            out.extend(_chunk_crcs(target, chunk))
            continue
        for off in range(0, n, chunk):
            if word.value > stop_above:
                return None
            end = min(n, off + chunk)
            np.copyto(target[off:end], source[off:end])
            out.extend(_chunk_crcs(target[off:end], chunk))
    failpoints.hit("native.copy.after_data", native=True)
    return out


def checksum_batch(addrs, sizes, chunk: int, threads: int = 0) -> list[int]:
    _check_chunk(chunk)
    _check_lengths([], addrs, sizes)
    out: list[int] = []
    for addr, n in zip(addrs, sizes):
        if n:
            out.extend(_chunk_crcs(_view(addr, n), chunk))
    return out


def copy_batch(dsts, srcs, sizes, threads: int = 0) -> None:
    _check_lengths(dsts, srcs, sizes)
    for dst, src, n in zip(dsts, srcs, sizes):
        if n:
            np.copyto(_view(dst, n), _view(src, n))


def store_u64_release(addr: int, value: int) -> None:
    if addr & 7:
        raise ValueError("address must be 8-byte aligned")
    if value:
        failpoints.hit("native.seal.before_flip", native=True)
    ctypes.c_uint64.from_address(addr).value = value
    if value:
        failpoints.hit("native.seal.after_flip", native=True)


FAILPOINT_NAMES = ("native.copy.after_data", "native.seal.before_flip", "native.seal.after_flip",
                   "native.send.after_header", "native.send.mid_stream", "native.recv.mid_stream",
                   "native.recv.before_ack")


def failpoint_names() -> list[str]:
    return list(FAILPOINT_NAMES)


def failpoint_hit(name: str) -> None:
    failpoints.hit(name, native=True)


def failpoints_armed() -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(failpoints.armed().items()) if k.startswith("native."))


def load_u64_acquire(addr: int) -> int:
    if addr & 7:
        raise ValueError("address must be 8-byte aligned")
    return ctypes.c_uint64.from_address(addr).value


# --- network ------------------------------------------------------------------------------------------
def _wait(fd: int, writable: bool, timeout_s: float, what: str) -> None:
    poller = select.poll()
    poller.register(fd, select.POLLOUT if writable else select.POLLIN)
    ms = -1 if timeout_s <= 0 else int(timeout_s * 1000 + 0.5)
    if not poller.poll(ms):
        raise OSError(errno.ETIMEDOUT, f"{what}: no progress for {timeout_s} s (peer unresponsive)")


class _MidPoint:
    """A failpoint half-way through a transfer of n bytes (I/O stops at n/2 once while it is armed)."""

    def __init__(self, name: str, n: int) -> None:
        self.name, self.half = name, n // 2
        self.on = n > 1 and name in failpoints.armed()

    def cap(self, done: int, want: int) -> int:
        return min(want, self.half - done) if self.on and done < self.half else want

    def passed(self, done: int) -> None:
        if self.on and done >= self.half:
            self.on = False
            failpoints.hit(self.name, native=True)


def send_file_range(sock_fd: int, file_fd: int, offset: int, n: int, timeout_s: float) -> int:
    sent = 0
    failpoints.hit("native.send.after_header", native=True)
    mid = _MidPoint("native.send.mid_stream", n)
    while sent < n:
        try:
            r = os.sendfile(sock_fd, file_fd, offset + sent, mid.cap(sent, min(n - sent, 1 << 30)))
        except BlockingIOError:
            _wait(sock_fd, True, timeout_s, "sendfile")
            continue
        if r == 0:
            raise OSError(errno.EIO, "sendfile: source file ended before the range was sent")
        sent += r
        mid.passed(sent)
    return sent


def send_addr(sock_fd: int, addr: int, n: int, timeout_s: float) -> int:
    view = memoryview(_view(addr, n)) if n else memoryview(b"")
    sent = 0
    failpoints.hit("native.send.after_header", native=True)
    mid = _MidPoint("native.send.mid_stream", n)
    while sent < n:
        try:
            sent += os.write(sock_fd, view[sent : sent + mid.cap(sent, 1 << 30)])
        except BlockingIOError:
            _wait(sock_fd, True, timeout_s, "send")
            continue
        mid.passed(sent)
    return sent


def recv_checksum(sock_fd: int, addr: int, n: int, regions, chunk: int, timeout_s: float):
    _check_chunk(chunk)
    buf = _view(addr, n)
    view = memoryview(buf) if n else memoryview(bytearray())
    got = 0
    mid = _MidPoint("native.recv.mid_stream", n)
    while got < n:
        try:
            r = os.readv(sock_fd, [view[got : got + mid.cap(got, n - got)]])
        except BlockingIOError:
            _wait(sock_fd, False, timeout_s, "recv")
            continue
        if r == 0:
            break
        got += r
        mid.passed(got)
    if got == n and n > 0:
        failpoints.hit("native.recv.before_ack", native=True)
    crcs: list[int] = []
    for off, size in regions:
        if off + size > n:
            raise ValueError("region lies outside the receive range")
        for start in range(off, off + size, chunk):
            end = min(off + size, start + chunk)
            arrived = max(0, min(end, got) - start)
            crcs.append(_raw(_MASK, buf[start : start + arrived]) ^ _MASK)
    return got, crcs


def blast_send(sock_fd: int, addr: int, n: int, timeout_s: float) -> int:
    return send_addr(sock_fd, addr, n, timeout_s)


def blast_recv(sock_fd: int, addr: int, n: int, timeout_s: float) -> int:
    return recv_checksum(sock_fd, addr, n, [], 1, timeout_s)[0]


# --- CUDA (absent) ------------------------------------------------------------------------------------
_NO_CUDA = "no CUDA device: the pure-Python twin of resilient._native has no CUDA support"


def cuda_compiled() -> bool:
    return False


def cuda_available() -> bool:
    return False


def cuda_status() -> str:
    return "pure-Python twin (no CUDA support)"


def cuda_device_count() -> int:
    return 0


def _no_cuda(*_args, **_kwargs):
    raise RuntimeError(_NO_CUDA)


cuda_set_device = register = unregister = _no_cuda
stream_create = stream_destroy = stream_synchronize = stream_wait_event = _no_cuda
copy_d2h_async = copy_h2d_async = _no_cuda
event_create = event_destroy = event_record = event_query = event_synchronize = _no_cuda
event_elapsed_ms = crc32c_device = crc32c_device_async = _no_cuda
