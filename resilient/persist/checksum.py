"""Checksums of checkpoint files: one crc32 pass gives every tensor's crc32 and the whole file's.

A shard file is checked by crc32 (zlib's polynomial, ~4 GB/s with the GIL released, against ~1.8 GB/s
for sha256) per tensor and per file. The file's crc32 is not computed in a second pass: it is combined
from the header's crc32 and the tensors' crc32s in file order (``crc32_combine``, as zlib's
``crc32_combine64``), so checksumming costs one read of the bytes.
"""

from __future__ import annotations

import zlib

_POLY = 0xEDB88320
CHUNK = 16 << 20  # checksum in 16 MiB pieces (each releases the GIL)


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the crc32 polynomial (reflected bit order)."""
    m = 1 << 31
    p = 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                break
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return p


def _x2n_table() -> list[int]:
    table = []
    p = 1 << 30  # x^1
    table.append(p)
    for _ in range(1, 32):
        p = _multmodp(p, p)
        table.append(p)
    return table


_X2N = _x2n_table()


def _x2nmodp(n: int, k: int) -> int:
    """x^(n * 2^k) modulo the polynomial."""
    p = 1 << 31  # x^0
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """crc32 of A+B from crc32(A), crc32(B) and len(B)."""
    if len2 <= 0:
        return crc1
    return _multmodp(_x2nmodp(len2, 3), crc1) ^ (crc2 & 0xFFFFFFFF)


def crc32(data: memoryview | bytes, value: int = 0) -> int:
    """crc32 of ``data`` (continuing from ``value``), in GIL-releasing chunks."""
    view = memoryview(data).cast("B")
    for start in range(0, view.nbytes, CHUNK):
        value = zlib.crc32(view[start:start + CHUNK], value)
    return value
