"""Binary layout of a shard segment: header, per-slot records, tensor index encoding (pure, no I/O).

File layout (little-endian)::

    [0, 4096)                       header: magic, format version, sizes, owner pid + start time, job, rank
      [1024 + 256*s, +64)           slot record s (s = 0, 1): seq, step, generation, bytes, index crc ...
    [4096, 4096 + 2*index_cap)      index region of slot 0, then slot 1
    [data_offset, +slot_stride)     data area of slot 0 (tensors then meta), then slot 1

A slot is sealed when its ``seq`` is non-zero; the latest snapshot is the sealed slot with the highest
seq. A writer first stores seq = 0 into the slot it is about to overwrite, copies data, writes the
index and record, then publishes a new seq with a release store (the atomic flip).

Index blob: u32 json length, JSON {"tensors": [[name, dtype, shape, offset, nbytes], ...],
"meta": [offset, nbytes], "chunk": c}, zero padding to 4 bytes, then one u32 CRC32C per chunk of every
region (tensors in order, then meta; a region of n bytes has ceil(n / chunk) chunks).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

MAGIC = b"RSLNTSHM"
FORMAT_VERSION = 1
HEADER_SIZE = 4096
PAGE = 4096
ALIGN = 256
DEFAULT_CHUNK = 1 << 20
SLOT_RECORD_OFFSET = 1024
SLOT_RECORD_STRIDE = 256
META_NAME = "<meta>"

STATE_EMPTY, STATE_WRITING, STATE_SEALED = 0, 1, 2

# magic, version, header_size, capacity, index_capacity, chunk, owner_pid, owner_start, rank,
# created_ns, data_offset, slot_stride, job_len, job
HEADER = struct.Struct("<8sIIQQQqQqQQQI4x256s")
# seq, step, generation, nbytes, index_nbytes, index_crc, state, sealed_ns, writer_pid
SLOT_RECORD = struct.Struct("<QqqQQIIQq")
MAX_JOB_BYTES = 256


def align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def chunk_count(n: int, chunk: int) -> int:
    return 0 if n == 0 else (n + chunk - 1) // chunk


def default_index_capacity(capacity: int, chunk: int) -> int:
    return align((1 << 20) + 8 * (capacity // chunk + 1), PAGE)


@dataclass(frozen=True)
class Header:
    capacity: int
    index_capacity: int
    chunk: int
    owner_pid: int
    owner_start: int
    rank: int
    created_ns: int
    data_offset: int
    slot_stride: int
    job: str

    @property
    def total_size(self) -> int:
        return self.data_offset + 2 * self.slot_stride

    def index_offset(self, slot: int) -> int:
        return HEADER_SIZE + slot * self.index_capacity

    def data_offset_of(self, slot: int) -> int:
        return self.data_offset + slot * self.slot_stride

    @staticmethod
    def record_offset(slot: int) -> int:
        return SLOT_RECORD_OFFSET + slot * SLOT_RECORD_STRIDE

    def pack(self) -> bytes:
        job = self.job.encode()
        return HEADER.pack(
            MAGIC, FORMAT_VERSION, HEADER_SIZE, self.capacity, self.index_capacity, self.chunk,
            self.owner_pid, self.owner_start, self.rank, self.created_ns, self.data_offset,
            self.slot_stride, len(job), job,
        )

    @classmethod
    def unpack(cls, buf, where: str) -> "Header":
        """Parse a header; ``ValueError`` naming ``where`` when it is not a segment of this version."""
        if len(buf) < HEADER.size:
            raise ValueError(f"{where} is too small ({len(buf)} bytes) to be a resilient segment.")
        (magic, version, header_size, capacity, index_capacity, chunk, owner_pid, owner_start, rank,
         created_ns, data_offset, slot_stride, job_len, job) = HEADER.unpack_from(buf, 0)
        if magic != MAGIC:
            raise ValueError(f"{where} is not a resilient segment (magic {magic!r}, expected {MAGIC!r}).")
        if version != FORMAT_VERSION or header_size != HEADER_SIZE:
            raise ValueError(
                f"{where} has segment format version {version} (header {header_size} bytes) but this "
                f"resilient reads version {FORMAT_VERSION}; recreate the segment."
            )
        return cls(capacity, index_capacity, chunk, owner_pid, owner_start, rank, created_ns,
                   data_offset, slot_stride, job[:job_len].decode())


def plan_header(capacity: int, chunk: int, index_capacity: int | None, *, job: str, rank: int,
                owner_pid: int, owner_start: int, created_ns: int) -> Header:
    index_capacity = align(index_capacity or default_index_capacity(capacity, chunk), PAGE)
    data_offset = align(HEADER_SIZE + 2 * index_capacity, PAGE)
    return Header(capacity, index_capacity, chunk, owner_pid, owner_start, rank, created_ns, data_offset,
                  align(max(capacity, 1), PAGE), job)


@dataclass(frozen=True)
class SlotRecord:
    seq: int
    step: int
    generation: int
    nbytes: int
    index_nbytes: int
    index_crc: int
    state: int
    sealed_ns: int
    writer_pid: int

    def pack(self) -> bytes:
        return SLOT_RECORD.pack(self.seq, self.step, self.generation, self.nbytes, self.index_nbytes,
                                self.index_crc, self.state, self.sealed_ns, self.writer_pid)

    @classmethod
    def unpack(cls, buf, offset: int) -> "SlotRecord":
        return cls(*SLOT_RECORD.unpack_from(buf, offset))


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lives in a slot's data area."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class SlotIndex:
    """A slot's tensor index, meta location and per-chunk checksums."""

    tensors: tuple[TensorSpec, ...]
    meta_offset: int
    meta_nbytes: int
    chunk: int
    crcs: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of the data area in use (up to the end of meta)."""
        return self.meta_offset + self.meta_nbytes

    def regions(self) -> list[tuple[str, int, int]]:
        """(name, offset, nbytes) of every checksummed region, in checksum order."""
        out = [(t.name, t.offset, t.nbytes) for t in self.tensors]
        out.append((META_NAME, self.meta_offset, self.meta_nbytes))
        return out

    def expected_chunks(self) -> int:
        return sum(chunk_count(n, self.chunk) for _, _, n in self.regions())

    def locate(self, flat_chunk: int) -> tuple[str, int, int, int]:
        """Map a flat chunk number to (region name, chunk within region, start, end byte in region)."""
        base = 0
        for name, _, n in self.regions():
            count = chunk_count(n, self.chunk)
            if flat_chunk < base + count:
                k = flat_chunk - base
                return name, k, k * self.chunk, min(n, (k + 1) * self.chunk)
            base += count
        raise IndexError(f"chunk {flat_chunk} is beyond the {base} chunks of this slot")

    def encode(self) -> bytes:
        doc = {
            "tensors": [[t.name, t.dtype, list(t.shape), t.offset, t.nbytes] for t in self.tensors],
            "meta": [self.meta_offset, self.meta_nbytes],
            "chunk": self.chunk,
        }
        body = json.dumps(doc, separators=(",", ":")).encode()
        pad = b"\0" * (align(4 + len(body), 4) - 4 - len(body))
        return struct.pack("<I", len(body)) + body + pad + struct.pack(f"<{len(self.crcs)}I", *self.crcs)

    @classmethod
    def decode(cls, blob: bytes) -> "SlotIndex":
        (n,) = struct.unpack_from("<I", blob, 0)
        doc = json.loads(bytes(blob[4 : 4 + n]))
        start = align(4 + n, 4)
        count = (len(blob) - start) // 4
        crcs = struct.unpack_from(f"<{count}I", blob, start)
        tensors = tuple(TensorSpec(name, dtype, tuple(shape), off, nb) for name, dtype, shape, off, nb in doc["tensors"])
        index = cls(tensors, doc["meta"][0], doc["meta"][1], doc["chunk"], tuple(crcs))
        if index.expected_chunks() != len(crcs):
            raise ValueError(f"index lists {len(crcs)} checksums but its regions have {index.expected_chunks()} chunks")
        return index
