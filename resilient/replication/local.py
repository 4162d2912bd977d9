"""The snapshot segments this agent holds: its own ranks' segments and the replicas it keeps for peers.

Names: ``<job>.<node>.own.r<rank>`` (the segment a local worker writes; the agent creates it) and
``<job>.<node>.rep.r<rank>`` (copies of another node's rank received from peers, or fetched for a
restore). Every segment is created by the agent (so a worker crash loses nothing) and adopted again by a
restarted agent on the same host. ``verify`` recomputes every chunk's CRC32C in place (no copy) and
returns the shard's digest: a hash of its tensor index checksums, which the manifest records, so a copy
is accepted only when its bytes match its own index and its index matches the sealed original.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from dataclasses import dataclass
from typing import Callable

from resilient.errors import ChecksumError, StoreError
from resilient.logs import get_logger
from resilient.store import Segment, backend, list_segments

log = get_logger(__name__)


@dataclass(frozen=True)
class Held:
    name: str
    rank: int
    own: bool
    slot: int
    step: int
    generation: int
    nbytes: int


def digest_of(crcs: tuple[int, ...]) -> str:
    return hashlib.blake2b(struct.pack(f"<{len(crcs)}I", *crcs), digest_size=16).hexdigest()


def verify(seg: Segment, slot: int) -> str:
    """Check every chunk of a sealed slot against its index; returns the shard digest (ChecksumError)."""
    index = seg.slot_index(slot)
    base = seg.slot_address(slot)
    regions = index.regions()
    got = backend().checksum_batch([base + off for _, off, _ in regions], [n for _, _, n in regions], index.chunk)
    if tuple(got) != tuple(index.crcs):
        bad = next(i for i, (a, b) in enumerate(zip(got, index.crcs)) if a != b) if len(got) == len(index.crcs) else -1
        where = index.locate(bad) if bad >= 0 else ("?", -1, 0, 0)
        raise ChecksumError(
            f"Segment {seg.name!r} slot {slot}: region {where[0]!r} chunk {where[1]} fails its checksum; this copy "
            "is corrupt and another holder must be used."
        )
    return digest_of(tuple(index.crcs))


GROW_SUFFIX = ".grow"  # a larger segment being filled before it replaces its namesake (removed on adopt)


def _headroom(nbytes: int) -> int:
    """Slot capacity for ``nbytes``: a little more, so that a snapshot a few bytes larger (its meta holds the
    step number) does not recreate the segment."""
    return max(nbytes + nbytes // 64 + (64 << 10), 1 << 12)


def receive_target(seg: Segment, keep: tuple[int, int] | None) -> int:
    """The slot a transfer received into ``seg`` goes over (after ``LocalShards.make_room(seg, keep)``): the
    slot not sealed last, unless that one holds ``keep`` (the committed ``(step, generation)``) and the
    newest does not; then the newest, uncommitted one."""
    latest = seg.latest()
    if latest is None:
        return seg.target_slot()
    other = seg.slots()[1 - latest.slot]
    if keep is not None and other.sealed and (other.step, other.generation) == keep and (latest.step, latest.generation) != keep:
        return latest.slot
    return other.slot


class LocalShards:
    """Segments held by one agent, by name; thread-safe."""

    def __init__(self, job: str, node_id: str, shm_dir: str | None) -> None:
        self.job = job
        self.node_id = node_id
        self.shm_dir = shm_dir
        self._prefix = f"{job}.{node_id}."
        self._segs: dict[str, Segment] = {}
        self._lock = threading.RLock()
        self.on_drop: Callable[[str], None] | None = None  # called with the name of each segment dropped

    def name(self, rank: int, own: bool) -> str:
        return f"{self._prefix}{'own' if own else 'rep'}.r{rank}"

    def adopt(self) -> list[str]:
        """Map segments this node left in the shm directory (a restarted agent on the same host)."""
        adopted = []
        for info in list_segments(self.job, self.shm_dir):
            if info.name.startswith(self._prefix) and info.name.endswith(GROW_SUFFIX):
                os.unlink(info.path)  # a growth its agent did not finish: the original is still in place
                continue
            if info.name.startswith(self._prefix) and info.name not in self._segs:
                try:
                    self._segs[info.name] = Segment.open(info.name, self.shm_dir)
                    adopted.append(info.name)
                except StoreError as exc:
                    log.warning("cannot adopt segment %s: %s", info.name, exc)
        return adopted

    def get(self, rank: int, own: bool) -> Segment | None:
        with self._lock:
            return self._segs.get(self.name(rank, own))

    def named(self, name: str) -> Segment | None:
        with self._lock:
            return self._segs.get(name)

    def ensure(self, rank: int, own: bool, nbytes: int, keep: tuple[int, int] | None = None) -> Segment:
        """The segment for ``rank`` with slots of at least ``nbytes`` (created with headroom, or recreated
        larger). A segment recreated larger carries over its copy of ``keep`` (the committed
        ``(step, generation)``), so growing never loses a committed copy."""
        name = self.name(rank, own)
        with self._lock:
            seg = self._segs.get(name)
            if seg is not None and seg.capacity >= nbytes:
                return seg
            if seg is not None:
                seg = self._grow(name, seg, nbytes, keep)
            else:
                try:
                    seg = Segment.open(name, self.shm_dir)
                    if seg.capacity < nbytes:
                        seg.unlink()
                        seg.close()
                        raise FileNotFoundError
                except (StoreError, FileNotFoundError):
                    seg = Segment.create(name, _headroom(nbytes), job=self.job, rank=rank, shm_dir=self.shm_dir)
            self._segs[name] = seg
            return seg

    def _grow(self, name: str, seg: Segment, nbytes: int, keep: tuple[int, int] | None) -> Segment:
        """Replace ``seg`` by a larger segment of the same name, with its copy of ``keep`` when it has one: the
        new segment is made under a temporary name, given that copy, then renamed over the old file."""
        kept = seg.sealed_slot(*keep) if keep is not None else None
        capacity = _headroom(nbytes)
        if kept is None:
            log.warning("segment %s grows from %d to %d bytes per slot; its old snapshots (no committed one) are dropped",
                        name, seg.capacity, capacity)
            self._drop(name)
            return Segment.create(name, capacity, job=self.job, rank=seg.rank, shm_dir=self.shm_dir)
        bigger = Segment.create(name + GROW_SUFFIX, capacity, job=self.job, rank=seg.rank, shm_dir=self.shm_dir)
        try:
            bigger.copy_slot_from(seg, kept)
            os.replace(bigger.path, seg.path)
        except BaseException:
            bigger.unlink()
            bigger.close()
            raise
        bigger.close()
        self._segs.pop(name, None)
        if self.on_drop is not None:
            self.on_drop(name)
        seg.close()
        log.warning("segment %s grows from %d to %d bytes per slot; it keeps its copy of the committed step %d, "
                    "the other snapshot is dropped", name, seg.capacity, capacity, keep[0])
        return Segment.open(name, self.shm_dir)

    def _drop(self, name: str) -> None:
        seg = self._segs.pop(name, None)
        if seg is not None:
            if self.on_drop is not None:
                self.on_drop(name)
            seg.unlink()
            try:
                seg.close()
            except StoreError as exc:
                log.warning("segment %s: %s", name, exc)

    def drop(self, rank: int, own: bool) -> None:
        with self._lock:
            self._drop(self.name(rank, own))

    def holdings(self) -> list[Held]:
        out = []
        with self._lock:
            for name, seg in self._segs.items():
                own = ".own.r" in name[len(self._prefix) - 1 :]
                for s in seg.slots():
                    if s.sealed:
                        out.append(Held(name, seg.rank, own, s.slot, s.step, s.generation, s.nbytes))
        return out

    def find(self, rank: int, step: int, generation: int) -> list[tuple[Segment, int]]:
        """Sealed slots holding ``rank``'s shard of ``step`` sealed in ``generation`` (own segment first)."""
        out = []
        with self._lock:
            for own in (True, False):
                seg = self._segs.get(self.name(rank, own))
                if seg is None:
                    continue
                slot = seg.sealed_slot(step, generation)
                if slot is not None:
                    out.append((seg, slot))
        return out

    def memory_bytes(self) -> int:
        """Bytes of shared memory reserved by the segments held (both slots, index and header)."""
        with self._lock:
            return sum(os.fstat(seg.fileno).st_size for seg in self._segs.values() if not seg.closed)

    def make_room(self, seg: Segment, keep: tuple[int, int] | None) -> None:
        """Before receiving into ``seg``: when the slot a receive would overwrite holds ``keep`` (the
        committed ``(step, generation)``), discard the newer, uncommitted slot instead, so the committed
        copy survives until a newer step is committed."""
        if keep is None:
            return
        with self._lock:
            latest = seg.latest()
            if latest is not None and receive_target(seg, keep) == latest.slot:
                seg._invalidate(latest.slot)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._segs)

    def close(self, unlink: bool) -> None:
        with self._lock:
            for name in list(self._segs):
                seg = self._segs.pop(name)
                if unlink:
                    seg.unlink()
                try:
                    seg.close()
                except StoreError as exc:
                    log.warning("segment %s: %s", name, exc)


__all__ = ["Held", "LocalShards", "digest_of", "receive_target", "verify"]
