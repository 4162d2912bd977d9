"""A shard segment: one rank's snapshots in shared memory, two slots with an atomic flip on seal.

The agent creates a segment (``Segment.create``: space reserved up front with fallocate), workers map
it (``Segment.open``), ``write`` copies tensors into the inactive slot with a CRC32C per chunk computed
in the same pass, ``seal`` publishes it, ``read``/``read_into`` verify and copy back. A writer killed
mid-copy leaves the previously sealed slot intact: the slot being written is invalidated (seq = 0)
before any byte of it changes, and gets a new seq only after data, index and record are in place.
CUDA tensors go through the registered mapping (see ``_cuda.py``). The byte layout is in ``layout.py``.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from resilient.errors import ChecksumError, StateError, StoreError, StoreSpaceError, WriteStoppedError
from resilient.logs import get_logger
from resilient.store import layout
from resilient.store._loader import backend
from resilient.store.layout import (
    ALIGN,
    DEFAULT_CHUNK,
    STATE_SEALED,
    STATE_WRITING,
    Header,
    SlotIndex,
    SlotRecord,
    TensorSpec,
    align,
)
from resilient.store.registry import check_name, process_start_ticks, resolve_shm_dir, segment_path

_log = get_logger(__name__)


@dataclass(frozen=True)
class SlotInfo:
    """State of one slot: ``sealed`` slots hold a complete snapshot of ``step``."""

    slot: int
    step: int
    generation: int
    nbytes: int
    sealed: bool


@dataclass(frozen=True)
class StopWhen:
    """Stop a write part-way once the int64 at ``address`` exceeds ``above`` (read before each chunk).

    A worker passes its control block's ``failed_generation`` and its own generation minus one: a snapshot
    still being copied when a member of its generation failed can never commit, so the copy ends there
    instead of delaying the recovery; ``write`` then raises ``WriteStoppedError`` and the slot stays
    invalid, like a writer killed mid-copy. The memory at ``address`` must stay mapped while a write uses
    it."""

    address: int
    above: int


@dataclass
class Snapshot:
    """A snapshot read back from a segment (tensors are fresh CPU copies, or the caller's targets)."""

    step: int
    generation: int
    meta: bytes
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Pending:
    slot: int
    step: int
    generation: int
    index: SlotIndex
    blob: bytes


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise StoreError(f"The segment names dtype {name!r}, which this torch ({torch.__version__}) does not know.")
    return dtype


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Segment:
    """One rank's shared-memory segment with two snapshot slots."""

    def __init__(self, path: str, fd: int, mm: mmap.mmap, header: Header) -> None:
        self.path = path
        self.name = os.path.basename(path)[len("resilient-") :]
        self._fd = fd
        self._mm = mm
        self._header = header
        self._anchor = ctypes.c_char.from_buffer(mm)
        self._base = ctypes.addressof(self._anchor)
        self._be = backend()
        self._pending: _Pending | None = None
        self._inflight: PendingWrite | None = None  # the write_async whose copies may still run
        self._cuda = None  # resilient.store._cuda.CudaPath, created on first CUDA tensor
        self._high_seq = 0  # the largest seq this handle dropped or published (seqs never repeat through it)

    # --- construction ---------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        name: str,
        capacity: int,
        *,
        job: str,
        rank: int,
        shm_dir: str | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        index_capacity: int | None = None,
    ) -> "Segment":
        """Create and reserve a segment whose slots hold ``capacity`` bytes of tensors + meta each."""
        check_name(name)
        if capacity <= 0:
            raise StoreError(f"Segment capacity must be positive, got {capacity} bytes.")
        if chunk_size <= 0 or chunk_size % 8:
            raise StoreError(f"chunk_size must be a positive multiple of 8 bytes, got {chunk_size}.")
        if len(job.encode()) > layout.MAX_JOB_BYTES:
            raise StoreError(f"Job name {job!r} is longer than {layout.MAX_JOB_BYTES} bytes.")
        pid = os.getpid()
        header = layout.plan_header(
            capacity, chunk_size, index_capacity, job=job, rank=rank, owner_pid=pid,
            owner_start=process_start_ticks(pid) or 0, created_ns=time.time_ns(),
        )
        directory = resolve_shm_dir(shm_dir)
        path = segment_path(name, directory)
        total = header.total_size
        available = _available_bytes(directory)
        if available is not None and total > available:
            raise StoreSpaceError(_space_message(name, directory, total, available))
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError as exc:
            raise StoreError(
                f"Segment {name!r} already exists at {path}; open it with Segment.open, or unlink it first "
                "(reclaim_stale() removes segments of dead owners)."
            ) from exc
        except OSError as exc:
            raise StoreError(f"Cannot create segment file {path}: {exc}.") from exc
        try:
            try:
                os.posix_fallocate(fd, 0, total)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM, errno.EDQUOT):
                    raise StoreSpaceError(
                        _space_message(name, directory, total, _available_bytes(directory))
                    ) from exc
                raise StoreError(f"Cannot reserve {total} bytes for segment file {path}: {exc}.") from exc
            mm = _map(fd, total)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        seg = cls(path, fd, mm, header)
        packed = header.pack()
        mm[8 : len(packed)] = packed[8:]
        mm[0:8] = packed[:8]  # magic last: a half-made segment is never taken for a valid one
        _log.debug("created segment %s: %d bytes (2 x %d capacity)", path, total, capacity)
        return seg

    @classmethod
    def open(cls, name: str, shm_dir: str | None = None) -> "Segment":
        """Map an existing segment (from any process)."""
        path = segment_path(name, shm_dir)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise StoreError(
                f"No segment {check_name(name)!r} at {path}; the agent creates segments (list_segments() shows them)."
            ) from exc
        except OSError as exc:
            raise StoreError(f"Cannot open segment file {path}: {exc}.") from exc
        try:
            size = os.fstat(fd).st_size
            if size < layout.HEADER_SIZE:
                raise StoreError(f"{path} holds {size} bytes, too few for a resilient segment.")
            mm = _map(fd, size)
            try:
                header = Header.unpack(mm[: layout.HEADER.size], path)
            except ValueError as exc:
                mm.close()
                raise StoreError(str(exc)) from exc
            if header.total_size > size:
                mm.close()
                raise StoreError(f"{path} holds {size} bytes but its header describes {header.total_size}.")
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, mm, header)

    # --- properties -----------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self._header.capacity

    @property
    def job(self) -> str:
        return self._header.job

    @property
    def rank(self) -> int:
        return self._header.rank

    @property
    def chunk_size(self) -> int:
        return self._header.chunk

    @property
    def index_capacity(self) -> int:
        return self._header.index_capacity

    @property
    def owner_pid(self) -> int:
        return self._header.owner_pid

    @property
    def fileno(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._mm is None

    # --- slot records ---------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._mm is None:
            raise StoreError(f"Segment {self.name!r} is closed.")

    def _record(self, slot: int) -> SlotRecord:
        return SlotRecord.unpack(self._mm, Header.record_offset(slot))

    def _seq(self, slot: int) -> int:
        return self._be.load_u64_acquire(self._base + Header.record_offset(slot))

    def _write_record(self, slot: int, record: SlotRecord) -> None:
        """Write every field but seq, then publish seq with a release store (the flip)."""
        off = Header.record_offset(slot)
        packed = record.pack()
        self._mm[off + 8 : off + len(packed)] = packed[8:]
        self._be.store_u64_release(self._base + off, record.seq)

    def _invalidate(self, slot: int) -> None:
        self._high_seq = max(self._high_seq, self._seq(slot))  # the next seal numbers past the copy dropped here
        self._be.store_u64_release(self._base + Header.record_offset(slot), 0)
        off = Header.record_offset(slot)
        rec = SlotRecord(0, -1, -1, 0, 0, 0, STATE_WRITING, 0, os.getpid())
        self._mm[off + 8 : off + layout.SLOT_RECORD.size] = rec.pack()[8:]

    def slots(self) -> list[SlotInfo]:
        """State of both slots."""
        self._check_open()
        out = []
        for s in (0, 1):
            rec = self._record(s)
            out.append(SlotInfo(s, rec.step, rec.generation, rec.nbytes, rec.seq != 0))
        return out

    def sealed_slot(self, step: int, generation: int) -> int | None:
        """The slot holding a sealed snapshot of ``step`` taken in ``generation``, or None."""
        for info in self.slots():
            if info.sealed and info.step == step and info.generation == generation:
                return info.slot
        return None

    def _latest_slot(self) -> int | None:
        seqs = [self._seq(0), self._seq(1)]
        if not any(seqs):
            return None
        return 0 if seqs[0] > seqs[1] else 1

    def latest(self) -> SlotInfo | None:
        """The most recently sealed slot, or None before the first seal."""
        self._check_open()
        slot = self._latest_slot()
        return None if slot is None else self.slots()[slot]

    def _select(self, step: int | None) -> int:
        if step is None:
            slot = self._latest_slot()
            if slot is None:
                raise StoreError(f"Segment {self.name!r} has no sealed snapshot yet.")
            return slot
        for info in self.slots():
            if info.sealed and info.step == step:
                return info.slot
        sealed = sorted(i.step for i in self.slots() if i.sealed)
        raise StoreError(f"Segment {self.name!r} holds no sealed snapshot of step {step}; sealed steps: {sealed}.")

    def _load_index(self, slot: int) -> tuple[SlotRecord, SlotIndex]:
        rec = self._record(slot)
        h = self._header
        if rec.index_nbytes > h.index_capacity or rec.nbytes > h.capacity:
            raise ChecksumError(
                f"Segment {self.name!r} slot {slot} record is corrupt (index {rec.index_nbytes} bytes, data "
                f"{rec.nbytes} bytes, capacity {h.index_capacity}/{h.capacity}); restore from a replica."
            )
        start = h.index_offset(slot)
        blob = bytes(self._mm[start : start + rec.index_nbytes])
        crc = self._be.crc32c(blob)
        if crc != rec.index_crc:
            raise ChecksumError(
                f"Segment {self.name!r} slot {slot} (step {rec.step}): the tensor index fails its checksum "
                f"(expected {rec.index_crc:#010x}, got {crc:#010x}); restore from a replica."
            )
        try:
            return rec, SlotIndex.decode(blob)
        except (ValueError, KeyError) as exc:
            raise ChecksumError(f"Segment {self.name!r} slot {slot}: the tensor index is unreadable: {exc}.") from exc

    def slot_index(self, slot: int) -> SlotIndex:
        """The tensor index of a sealed slot (checked against its checksum)."""
        self._check_open()
        if self._seq(slot) == 0:
            raise StoreError(f"Segment {self.name!r} slot {slot} is not sealed.")
        return self._load_index(slot)[1]

    # --- write / seal ---------------------------------------------------------------------------------
    def _plan(self, tensors: dict[str, torch.Tensor], meta: bytes) -> tuple[SlotIndex, list[torch.Tensor]]:
        specs, order, off = [], [], 0
        for name, t in tensors.items():
            if not isinstance(name, str):
                raise StateError(f"Tensor names must be strings, got {name!r}.")
            if not isinstance(t, torch.Tensor):
                raise StateError(f"Value for {name!r} is a {type(t).__name__}, not a torch.Tensor.")
            if t.device.type not in ("cpu", "cuda"):
                raise StateError(f"Tensor {name!r} is on device {t.device}; only CPU and CUDA tensors can be stored.")
            if not t.is_contiguous():
                raise StateError(
                    f"Tensor {name!r} (shape {tuple(t.shape)}, stride {t.stride()}) is not contiguous; "
                    "pass tensor.contiguous() instead."
                )
            off = align(off, ALIGN)
            n = _nbytes(t)
            specs.append(TensorSpec(name, dtype_name(t.dtype), tuple(t.shape), off, n))
            order.append(t)
            off += n
        meta_off = align(off, ALIGN)
        total = meta_off + len(meta)
        if total > self.capacity:
            raise StoreSpaceError(
                f"Snapshot needs {total} bytes ({len(specs)} tensors + {len(meta)} bytes of meta) but segment "
                f"{self.name!r} holds {self.capacity} bytes per slot; create it with a larger capacity."
            )
        return SlotIndex(tuple(specs), meta_off, len(meta), self.chunk_size, ()), order

    def write(self, tensors: dict[str, torch.Tensor], *, step: int, generation: int, meta: bytes = b"",
              keep_step: int | None = None, stop: StopWhen | None = None) -> None:
        """Copy tensors + meta into the inactive slot (checksummed); ``seal`` publishes it.

        ``keep_step``: a step whose sealed copy must survive this write (the committed step). The write goes
        to the slot not sealed last, unless that slot holds ``keep_step``: then it replaces the newest one.
        ``stop``: end the copy of CPU tensors part-way when its word rises (see ``StopWhen``); raises
        ``WriteStoppedError`` then, with nothing to seal."""
        slot, index, order, per_tensor, gpu, meta_crcs = self._begin_write(tensors, meta, keep_step, stop)
        if gpu:
            base = self._base + self._header.data_offset_of(slot)
            crcs = self._cuda_path().write(
                [(base + index.tensors[i].offset, order[i]) for i in gpu], self.chunk_size
            )
            for i, c in zip(gpu, crcs):
                per_tensor[i] = c
        self._pending = self._index_written(slot, step, generation, index, per_tensor, meta_crcs)

    def write_async(
        self, tensors: dict[str, torch.Tensor], *, step: int, generation: int, meta: bytes = b"",
        keep_step: int | None = None, stop: StopWhen | None = None,
    ) -> "PendingWrite":
        """Like ``write`` + ``seal``, but CUDA tensors are copied on a side stream while the caller goes on.

        CPU tensors and meta are copied (and checksummed) before this returns; CUDA tensors are queued: the
        D2H copy into the registered mapping and the GPU CRC32C kernels run on side streams after an event
        recorded on the caller's current stream. ``PendingWrite.wait()`` completes the checksums and seals;
        until then the caller must not change the CUDA tensors (the slot's previous snapshot stays the
        latest one). A write while one is pending waits for it first. Without CUDA tensors, or without a
        CUDA-enabled native module, everything is copied and sealed here and the result is already done."""
        self.wait_pending()
        self._check_open()
        gpu_any = any(isinstance(t, torch.Tensor) and t.device.type == "cuda" and t.numel() for t in tensors.values())
        if not gpu_any or not self._cuda_path().can_overlap:
            self.write(tensors, step=step, generation=generation, meta=meta, keep_step=keep_step, stop=stop)
            return PendingWrite(self, None, self.seal())
        slot, index, order, per_tensor, gpu, meta_crcs = self._begin_write(tensors, meta, keep_step, stop)
        base = self._base + self._header.data_offset_of(slot)
        ticket = self._cuda_path().write_async(
            [(base + index.tensors[i].offset, order[i]) for i in gpu], self.chunk_size
        )
        pending = PendingWrite(self, _InFlight(ticket, slot, step, generation, index, per_tensor, gpu, meta_crcs), None)
        self._inflight = pending
        return pending

    @staticmethod
    def overlap_available() -> bool:
        """Whether ``write_async`` of CUDA tensors overlaps the copy here (CUDA-enabled native module)."""
        be = backend()
        return hasattr(be, "crc32c_device_async") and bool(be.cuda_available())

    def wait_pending(self) -> SlotInfo | None:
        """Finish the ``write_async`` in flight, if any (blocks until its copy landed; seals it)."""
        pending = self._inflight
        return None if pending is None else pending.wait()

    def _complete(self, flight: "_InFlight") -> SlotInfo:
        """Called by ``PendingWrite.wait``: the copies landed; write the index and publish the slot."""
        self._check_open()
        crcs = flight.ticket.wait()
        for i, c in zip(flight.gpu, crcs):
            flight.per_tensor[i] = c
        p = self._index_written(flight.slot, flight.step, flight.generation, flight.index, flight.per_tensor,
                                flight.meta_crcs)
        self._publish(p.slot, p.step, p.generation, p.index.nbytes, p.blob)
        return SlotInfo(p.slot, p.step, p.generation, p.index.nbytes, True)

    def target_slot(self, keep_step: int | None = None) -> int:
        """The slot the next write goes to (see ``write``'s ``keep_step``)."""
        latest = self._latest_slot()
        if latest is None:
            return 0
        other = 1 - latest
        if keep_step is not None:
            rec = self._record(other)
            if rec.seq != 0 and rec.step == keep_step and self._record(latest).step != keep_step:
                return latest
        return other

    def _begin_write(self, tensors: dict[str, torch.Tensor], meta: bytes, keep_step: int | None = None,
                     stop: StopWhen | None = None):
        """Plan, invalidate the inactive slot, copy CPU tensors and meta; returns what the CUDA part needs.
        The CPU copy ends part-way when ``stop``'s word rises (``WriteStoppedError``; the slot stays invalid)."""
        self._check_open()
        self.wait_pending()
        meta = bytes(meta)
        index, order = self._plan(tensors, meta)
        blob_size = len(SlotIndex(index.tensors, index.meta_offset, index.meta_nbytes, index.chunk,
                                  (0,) * index.expected_chunks()).encode())
        if blob_size > self.index_capacity:
            raise StoreSpaceError(
                f"The tensor index of {len(order)} tensors needs {blob_size} bytes but segment {self.name!r} "
                f"reserves {self.index_capacity}; create it with a larger index_capacity."
            )
        slot = self.target_slot(keep_step)
        self._pending = None
        self._invalidate(slot)
        base = self._base + self._header.data_offset_of(slot)
        per_tensor: list[list[int] | None] = [None] * len(order)
        cpu = [i for i, t in enumerate(order) if t.device.type == "cpu" and index.tensors[i].nbytes]
        if cpu:
            flat = self._be.copy_checksum_batch(
                [base + index.tensors[i].offset for i in cpu],
                [order[i].data_ptr() for i in cpu],
                [index.tensors[i].nbytes for i in cpu],
                self.chunk_size,
                stop_word=stop.address if stop is not None else 0,
                stop_above=stop.above if stop is not None else 0,
            )
            if flat is None:
                raise WriteStoppedError(
                    f"The write of slot {slot} of segment {self.name!r} was stopped part-way: the int64 at "
                    f"{stop.address:#x} rose above {stop.above} (a member of the writer's generation failed). The slot "
                    "is invalid; the earlier snapshots stay."
                )
            pos = 0
            for i in cpu:
                k = layout.chunk_count(index.tensors[i].nbytes, self.chunk_size)
                per_tensor[i] = list(flat[pos : pos + k])
                pos += k
        gpu = [i for i, t in enumerate(order) if t.device.type == "cuda" and index.tensors[i].nbytes]
        if meta:
            moff = self._header.data_offset_of(slot) + index.meta_offset
            self._mm[moff : moff + len(meta)] = meta
            meta_crcs = list(self._be.checksum_batch([base + index.meta_offset], [len(meta)], self.chunk_size))
        else:
            meta_crcs = []
        return slot, index, order, per_tensor, gpu, meta_crcs

    def _index_written(self, slot: int, step: int, generation: int, index: SlotIndex,
                       per_tensor: list[list[int] | None], meta_crcs: list[int]) -> _Pending:
        crcs = [c for lst in per_tensor for c in (lst or [])] + list(meta_crcs)
        index = SlotIndex(index.tensors, index.meta_offset, index.meta_nbytes, index.chunk, tuple(crcs))
        blob = index.encode()
        start = self._header.index_offset(slot)
        self._mm[start : start + len(blob)] = blob
        return _Pending(slot, step, generation, index, blob)

    def seal(self) -> SlotInfo:
        """Publish the slot written by the last ``write``: it becomes the latest sealed snapshot."""
        self._check_open()
        if self._pending is None:
            raise StoreError(f"Nothing to seal in segment {self.name!r}: call write() first.")
        p = self._pending
        self._publish(p.slot, p.step, p.generation, p.index.nbytes, p.blob)
        self._pending = None
        return SlotInfo(p.slot, p.step, p.generation, p.index.nbytes, True)

    def _publish(self, slot: int, step: int, generation: int, nbytes: int, blob: bytes) -> None:
        seq = max(self._seq(0), self._seq(1), self._high_seq) + 1
        self._high_seq = seq
        rec = SlotRecord(seq, step, generation, nbytes, len(blob), self._be.crc32c(blob), STATE_SEALED,
                         time.time_ns(), os.getpid())
        self._write_record(slot, rec)

    # --- read -----------------------------------------------------------------------------------------
    def _verify(self, slot: int, rec: SlotRecord, index: SlotIndex, got: list[int], names: list[str] | None = None) -> None:
        """Compare computed chunk CRCs with the index; ``names`` limits the check to those regions."""
        base = 0
        for name, _, n in index.regions():
            k = layout.chunk_count(n, index.chunk)
            if names is None or name in names:
                for j in range(k):
                    expected, actual = index.crcs[base + j], got[base + j]
                    if expected != actual:
                        _, _, lo, hi = index.locate(base + j)
                        what = "meta" if name == layout.META_NAME else f"tensor {name!r}"
                        err = ChecksumError(
                            f"Segment {self.name!r} slot {slot} (step {rec.step}): {what} chunk {j} (bytes "
                            f"{lo}..{hi} of it) fails its checksum (expected {expected:#010x}, got "
                            f"{actual:#010x}); the snapshot is corrupt, restore from a replica."
                        )
                        err.tensor, err.chunk, err.slot = name, j, slot
                        raise err
            base += k

    def _check_unchanged(self, slot: int, seq: int) -> None:
        if self._seq(slot) != seq:
            raise StoreError(
                f"Segment {self.name!r} slot {slot} was overwritten while it was being read; read again."
            )

    def read(self, *, step: int | None = None, verify: bool = True,
             into: Mapping[str, torch.Tensor] | None = None) -> Snapshot:
        """Copies of the latest sealed snapshot (or the sealed one of ``step``), verified unless told not to.

        ``into``: tensors to read straight into, by name (a restore passes the live parameters, saving an
        allocation, its page faults and a second copy); one whose dtype or shape differs from the stored
        tensor's, or that is not contiguous, is left alone and a fresh one is read instead (the caller's
        ``load_state_dict`` then reports the mismatch). The others come back as fresh CPU tensors."""
        self._check_open()
        slot = self._select(step)
        seq = self._seq(slot)
        rec, index = self._load_index(slot)
        into = into or {}
        targets = {}
        for spec in index.tensors:
            given = into.get(spec.name)
            if not fits_stored(given, spec.dtype, spec.shape):
                given = torch.empty(spec.shape, dtype=dtype_from_name(spec.dtype))
            targets[spec.name] = given
        return self._read_targets(slot, seq, rec, index, targets, verify)

    def read_into(self, targets: dict[str, torch.Tensor], *, step: int | None = None, verify: bool = True) -> Snapshot:
        """Copy stored tensors into the caller's tensors (CPU or CUDA; same dtype and shape, contiguous)."""
        self._check_open()
        slot = self._select(step)
        seq = self._seq(slot)
        rec, index = self._load_index(slot)
        specs = {t.name: t for t in index.tensors}
        for name, t in targets.items():
            spec = specs.get(name)
            if spec is None:
                raise StateError(
                    f"Segment {self.name!r} step {rec.step} holds no tensor {name!r}; it holds {sorted(specs)}."
                )
            if not isinstance(t, torch.Tensor) or not t.is_contiguous():
                raise StateError(f"Target for {name!r} must be a contiguous torch.Tensor.")
            if dtype_name(t.dtype) != spec.dtype or tuple(t.shape) != spec.shape:
                raise StateError(
                    f"Target for {name!r} is {dtype_name(t.dtype)}{list(t.shape)} but the snapshot holds "
                    f"{spec.dtype}{list(spec.shape)}."
                )
            if t.device.type not in ("cpu", "cuda"):
                raise StateError(f"Target for {name!r} is on device {t.device}; use a CPU or CUDA tensor.")
        return self._read_targets(slot, seq, rec, index, targets, verify)

    def _read_targets(self, slot: int, seq: int, rec: SlotRecord, index: SlotIndex, targets: dict[str, torch.Tensor],
                      verify: bool) -> Snapshot:
        """Copy the named stored tensors (checked to fit) and the meta out of ``slot``, verifying if asked."""
        specs = {t.name: t for t in index.tensors}
        base = self._base + self._header.data_offset_of(slot)
        regions = index.regions()
        got: list[int] = [0] * len(index.crcs)
        starts, pos = {}, 0
        for name, _, n in regions:
            starts[name] = pos
            pos += layout.chunk_count(n, index.chunk)
        cpu = [n for n, t in targets.items() if t.device.type == "cpu" and specs[n].nbytes]
        gpu = [n for n, t in targets.items() if t.device.type == "cuda" and specs[n].nbytes]
        if cpu:
            dsts = [targets[n].data_ptr() for n in cpu]
            srcs = [base + specs[n].offset for n in cpu]
            sizes = [specs[n].nbytes for n in cpu]
            if verify:
                flat = self._be.copy_checksum_batch(dsts, srcs, sizes, index.chunk)
                self._scatter(flat, cpu, specs, starts, index.chunk, got)
            else:
                self._be.copy_batch(dsts, srcs, sizes)
        if gpu:
            crcs = self._cuda_path().read([(targets[n], base + specs[n].offset) for n in gpu], index.chunk)
            if verify:
                self._scatter([c for lst in crcs for c in lst], gpu, specs, starts, index.chunk, got)
        meta_n = index.meta_nbytes
        meta_t = torch.empty(meta_n, dtype=torch.uint8)
        if meta_n:
            meta_crc = self._be.copy_checksum_batch([meta_t.data_ptr()], [base + index.meta_offset], [meta_n], index.chunk)
            self._scatter(meta_crc, [layout.META_NAME], {layout.META_NAME: _MetaSpec(meta_n)}, starts, index.chunk, got)
        if verify:
            self._verify(slot, rec, index, got, names=cpu + gpu + [layout.META_NAME])
        self._check_unchanged(slot, seq)
        return Snapshot(rec.step, rec.generation, meta_t.numpy().tobytes(), dict(targets))

    @staticmethod
    def _scatter(flat, names, specs, starts, chunk, got) -> None:
        pos = 0
        for n in names:
            k = layout.chunk_count(specs[n].nbytes, chunk)
            got[starts[n] : starts[n] + k] = flat[pos : pos + k]
            pos += k

    # --- raw access (transport, persistence) --------------------------------------------------------
    def slot_buffer(self, slot: int) -> memoryview:
        """Raw bytes of a slot's data area in use (release the view before ``close``)."""
        self._check_open()
        if slot not in (0, 1):
            raise StoreError(f"Slot must be 0 or 1, got {slot}.")
        rec = self._record(slot)
        start = self._header.data_offset_of(slot)
        return memoryview(self._mm)[start : start + min(rec.nbytes, self.capacity)]

    def slot_address(self, slot: int) -> int:
        """Address of a slot's data area in this process."""
        self._check_open()
        return self._base + self._header.data_offset_of(slot)

    def slot_file_offset(self, slot: int) -> int:
        """Offset of a slot's data area in the segment file (for sendfile)."""
        return self._header.data_offset_of(slot)

    def slot_seq(self, slot: int) -> int:
        """The slot's seal sequence number: 0 while unsealed (being written), and a new, larger number at
        every seal through the same handle, so an unchanged number means an unchanged copy."""
        return self._seq(slot)

    def seal_id(self, slot: int) -> tuple[int, int] | None:
        """What identifies the copy sealed in ``slot`` (its seq and seal time), also across writers (a
        respawned worker may number a seal as its predecessor did); None while the slot is unsealed."""
        seq = self._seq(slot)
        if seq == 0:
            return None
        rec = self._record(slot)
        return (seq, rec.sealed_ns) if rec.seq == seq else None

    def _index_blob(self, slot: int) -> bytes:
        rec = self._record(slot)
        start = self._header.index_offset(slot)
        return bytes(self._mm[start : start + rec.index_nbytes])

    def _prepare_receive(self) -> int:
        """Invalidate the inactive slot for an incoming transfer; returns it."""
        self._check_open()
        self.wait_pending()
        slot = self.target_slot()
        self._pending = None
        self._invalidate(slot)
        return slot

    def _commit_receive(self, slot: int, step: int, generation: int, index: SlotIndex, blob: bytes) -> SlotInfo:
        start = self._header.index_offset(slot)
        self._mm[start : start + len(blob)] = blob
        self._publish(slot, step, generation, index.nbytes, blob)
        return SlotInfo(slot, step, generation, index.nbytes, True)

    def copy_slot_from(self, src: "Segment", slot: int) -> SlotInfo:
        """Copy the sealed ``slot`` of ``src`` into this segment (the slot a receive would take), verified
        chunk by chunk against its index as it is copied; used to carry a committed copy over when a
        segment is replaced by a larger one. ChecksumError when the source copy is corrupt, StoreError
        when it does not fit or changes while it is copied."""
        seq = src.slot_seq(slot)
        if seq == 0:
            raise StoreError(f"Segment {src.name!r} slot {slot} is not sealed; there is nothing to copy.")
        rec, index = src._load_index(slot)
        blob = src._index_blob(slot)
        if rec.nbytes > self.capacity or len(blob) > self.index_capacity:
            raise StoreError(f"Slot {slot} of segment {src.name!r} ({rec.nbytes} bytes) does not fit segment "
                             f"{self.name!r} ({self.capacity} bytes per slot).")
        dst = self._prepare_receive()
        regions = index.regions()
        base, src_base = self.slot_address(dst), src.slot_address(slot)
        got = self._be.copy_checksum_batch([base + off for _, off, _ in regions], [src_base + off for _, off, _ in regions],
                                           [n for _, _, n in regions], index.chunk)
        src._check_unchanged(slot, seq)
        if tuple(got) != tuple(index.crcs):
            raise ChecksumError(f"Segment {src.name!r} slot {slot} (step {rec.step}) fails its checksum while copied into "
                                f"{self.name!r}; that copy is corrupt.")
        return self._commit_receive(dst, rec.step, rec.generation, index, blob)

    def _cuda_path(self):
        if self._cuda is None:
            from resilient.store._cuda import CudaPath

            self._cuda = CudaPath(self._be, self._base, len(self._mm))
        return self._cuda

    # --- lifetime -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap the segment (the file stays; ``unlink`` removes it)."""
        if self._mm is None:
            return
        if self._inflight is not None:
            try:
                self._inflight.wait()  # the copies read device memory into this mapping: finish them first
            except StoreError as exc:
                _log.warning("segment %s closes with an unfinished asynchronous write (not sealed): %s", self.name, exc)
        if self._cuda is not None:
            self._cuda.close()
            self._cuda = None
        del self._anchor
        try:
            self._mm.close()
        except BufferError as exc:
            self._anchor = ctypes.c_char.from_buffer(self._mm)
            raise StoreError(
                f"Segment {self.name!r} is still referenced by a memoryview from slot_buffer(); release it first."
            ) from exc
        self._mm = None
        os.close(self._fd)
        self._fd = -1

    def unlink(self) -> None:
        """Remove the segment file (mappings stay valid until closed)."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "Segment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Segment({self.name!r}, job={self.job!r}, rank={self.rank}, capacity={self.capacity})"


@dataclass
class _InFlight:
    ticket: object  # resilient.store._cuda.CudaTicket
    slot: int
    step: int
    generation: int
    index: SlotIndex
    per_tensor: list
    gpu: list[int]
    meta_crcs: list[int]


class PendingWrite:
    """A ``Segment.write_async`` whose device-to-host copies may still run.

    ``done()`` polls without blocking; ``wait()`` blocks until the copies and GPU checksums landed, writes
    the slot's index and seals it, and returns its ``SlotInfo`` (later calls return the same). Until then
    the snapshot's CUDA tensors must not change, except by kernels queued after ``stream_wait()``.
    ``step``, ``generation`` and ``nbytes`` describe it.
    """

    def __init__(self, segment: Segment, flight: _InFlight | None, info: SlotInfo | None) -> None:
        self._segment = segment
        self._flight = flight
        self._info = info
        self._error: BaseException | None = None
        src = flight if flight is not None else info
        self.step, self.generation = src.step, src.generation
        self.nbytes = flight.index.nbytes if flight is not None else info.nbytes

    @property
    def sealed(self) -> bool:
        return self._info is not None

    def done(self) -> bool:
        """True once ``wait()`` would not block (the copies landed, or it already sealed)."""
        return self._info is not None or self._error is not None or self._flight.ticket.done()

    def stream_wait(self, stream: "torch.cuda.Stream | None" = None) -> None:
        """Make ``stream`` (default: the current stream of each device involved) wait on the GPU until the
        copies finished, without blocking this thread: kernels queued there afterwards may change the
        snapshot's tensors. Sealing still takes ``wait()``."""
        if self._info is None and self._error is None:
            self._flight.ticket.stream_wait(stream)

    def wait(self) -> SlotInfo:
        if self._info is not None:
            return self._info
        if self._error is not None:
            raise StoreError(
                f"The asynchronous write of step {self.step} failed earlier: {self._error}"
            ) from self._error
        try:
            self._info = self._segment._complete(self._flight)
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            if self._segment._inflight is self:
                self._segment._inflight = None
            self._flight = None if self._info is not None else self._flight
        return self._info

    def __repr__(self) -> str:
        state = "sealed" if self._info is not None else ("failed" if self._error is not None else "in flight")
        return f"PendingWrite(step={self.step}, generation={self.generation}, nbytes={self.nbytes}, {state})"


@dataclass(frozen=True)
class _MetaSpec:
    nbytes: int


def fits_stored(t: object, dtype: str, shape: tuple[int, ...]) -> bool:
    """Whether ``t`` can take a stored tensor of ``dtype`` (its stored name) and ``shape`` as it is: a
    contiguous CPU tensor of that dtype and shape."""
    return (isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.is_contiguous()
            and dtype_name(t.dtype) == dtype and tuple(t.shape) == tuple(shape))


def _map(fd: int, size: int) -> mmap.mmap:
    """Map shared, not pre-faulted: page-table entries are made by the first touch of each page.

    The file's pages already exist (``posix_fallocate`` reserved them on tmpfs), so a first touch is a
    minor fault (no zeroing, no allocation). Pre-faulting the whole mapping (``MAP_POPULATE`` or
    ``madvise(MADV_POPULATE_WRITE)``) cost 0.5 s per 2.7 GB segment at every open, on the recovery path
    three times over (the agent reading a marker, the restore, the writer's first snapshot), for pages a
    reader mostly never touches; faulting a slot in during the first write into it costs 0.15 s per GB,
    once. (``MAP_POPULATE`` also held the GIL for the whole call: an agent creating big segments lost its
    etcd lease that way.)"""
    return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


def _available_bytes(directory: str) -> int | None:
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _space_message(name: str, directory: str, needed: int, available: int | None) -> str:
    avail = "an unknown number of" if available is None else str(available)
    return (
        f"Cannot reserve {needed} bytes for segment {name!r} in {directory}: only {avail} bytes are available "
        f"there. Free space in {directory}, give the container a larger /dev/shm (e.g. docker --shm-size), or "
        f"point RESILIENT_SHM_DIR at a larger tmpfs."
    )
