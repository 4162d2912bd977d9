"""``LocalSnapshots``: this node's snapshot segments when no peer replication runs (one node).

It has the ``ShardManager`` interface that the agent uses (``resilient.replication``), reduced to one
host: the agent creates each rank's segment (so a worker crash loses nothing), and step ``s`` is
committed when every rank of the node has sealed ``s`` and still holds it: a copy a worker announced it
is about to overwrite (``before_overwrite``, under the same lock) no longer counts. A segment replaced by a
larger one starts with the rank's copy of the committed step. With more than one node the agent uses the
``ShardManager``, which replicates shards to peers and commits job-wide through etcd.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from resilient import events
from resilient.errors import StoreError
from resilient.logs import get_logger
from resilient.replication.withdrawn import Withdrawn
from resilient.runtime.api import OverwriteAnswer, RestoreSource

log = get_logger(__name__)


SEGMENT_PREFIX = "rsl-"


def _headroom(nbytes: int) -> int:
    return nbytes + nbytes // 8 + (1 << 20)


@dataclass
class _Shard:
    segment: object  # resilient.store.Segment (creator handle)
    name: str
    capacity: int
    sealed: dict[int, tuple[int, int]]  # step -> (generation, nbytes), newest two


def _held(shard: _Shard, generation: int, withdrawn: Withdrawn) -> set[int]:
    """Steps of ``generation`` the rank reported sealed and its segment still holds (not about to be
    overwritten: ``before_overwrite``)."""
    return {s for s, (g, _n) in shard.sealed.items() if g == generation and withdrawn.held(shard.segment, s, g)}


class LocalSnapshots:
    def __init__(self, *, job: str, node: str, shm_dir: str | None = None) -> None:
        self._job = job
        self._node = node
        self._shm_dir = shm_dir
        self._lock = threading.Lock()
        self._shards: dict[int, _Shard] = {}
        self._ranks: tuple[int, ...] = ()
        self._world_size = 0
        self._committed: tuple[int, int] | None = None  # (step, generation)
        self._generation: int | None = None  # the current generation (commits are fenced by it)
        self._count = 0
        self._withdrawn = Withdrawn()
        self.on_commit = None  # callback(step, generation)

    def start(self) -> None:
        """Remove segments of dead single-node agents (their job ids are unique, so reclaim by name)."""
        from resilient.store.registry import list_segments, reclaim_stale

        reclaim_stale(job=self._job, shm_dir=self._shm_dir)
        for info in list_segments(None, self._shm_dir):
            if info.name.startswith(SEGMENT_PREFIX) and not info.owner_alive:
                try:
                    os.unlink(info.path)
                except FileNotFoundError:
                    continue

    def on_generation(self, ranks: tuple[int, ...], world_size: int, generation: int | None = None) -> None:
        """New membership. From now on only seals of ``generation`` can complete a commit: a seal of an
        older generation that arrives late (seals are asynchronous) must not move the committed step while
        the ranks of the new generation are reading it to restore (they would restore different steps)."""
        with self._lock:
            if world_size != self._world_size and self._world_size:
                log.info("world size %d -> %d: local snapshots are kept per rank", self._world_size, world_size)
            self._ranks = tuple(ranks)
            self._world_size = world_size
            if generation is not None:
                self._generation = generation

    def segment_for(self, rank: int, nbytes: int) -> str:
        from resilient.store import Segment

        with self._lock:
            shard = self._shards.get(rank)
            if shard is not None and shard.capacity >= nbytes:
                return shard.name
            self._count += 1
            capacity = _headroom(nbytes)
            name = f"{SEGMENT_PREFIX}{self._job}-{self._node}-r{rank}-{os.getpid()}-{self._count}"[:200]
            segment = Segment.create(name, capacity, job=self._job, rank=rank, shm_dir=self._shm_dir)
            old = self._shards.get(rank)
            sealed = {}
            if old is not None and self._committed is not None:
                # a bigger segment replaces the old one: it starts with the old one's copy of the committed step
                step, generation = self._committed
                slot = old.segment.sealed_slot(step, generation)
                if slot is not None and step in old.sealed:
                    try:
                        segment.copy_slot_from(old.segment, slot)
                        sealed[step] = old.sealed[step]
                    except StoreError as exc:
                        log.warning("rank %d: the committed step %d could not be carried into the larger segment "
                                    "%s: %s", rank, step, name, exc)
            self._shards[rank] = _Shard(segment, name, capacity, sealed)
            if old is not None:
                self._withdrawn.forget(old.name)
        if old is not None:
            old.segment.unlink()
        return name

    def before_overwrite(self, rank: int, segment: str) -> OverwriteAnswer:
        """A worker is about to write a snapshot into ``segment``: the committed step (the write keeps its
        copy) and, atomically with commits (``on_sealed`` decides under the same lock), the slot the write
        will go over stops counting as a copy, so a step is never committed on a copy being overwritten."""
        with self._lock:
            committed = None if self._committed is None else self._committed[0]
            shard = next((sh for sh in self._shards.values() if sh.name == segment), None)
            if shard is None:
                # not a segment of this agent (any more): nothing it commits on is overwritten
                log.warning("rank %d is about to write into segment %s, which this agent does not hold", rank, segment)
                return OverwriteAnswer(committed)
            self._withdrawn.withdraw(shard.segment, shard.segment.target_slot(committed))
            return OverwriteAnswer(committed)

    def on_sealed(self, rank: int, step: int, generation: int, nbytes: int) -> int | None:
        """Record a sealed step; returns the newly committed step, if this seal completed one."""
        with self._lock:
            shard = self._shards.get(rank)
            if shard is None:
                log.warning("rank %d sealed step %d without a segment from this agent; ignored", rank, step)
                return None
            shard.sealed[step] = (generation, nbytes)
            for old in sorted(shard.sealed)[:-2]:
                del shard.sealed[old]
            if self._generation is not None and generation != self._generation:
                log.info("rank %d sealed step %d in generation %d, not the current %d: kept, never committed",
                         rank, step, generation, self._generation)
                return None
            if not self._ranks or any(r not in self._shards for r in self._ranks):
                return None
            current = self._generation if self._generation is not None else generation
            # only steps every segment still holds: a worker may seal a newer snapshot over an uncommitted one
            # (it keeps the committed copy), and a step whose copy went is never committed
            common = set.intersection(*(_held(self._shards[r], current, self._withdrawn) for r in self._ranks))
            if not common:
                return None
            newest = max(common)
            if self._committed is not None and newest <= self._committed[0]:
                return None
            self._committed = (newest, generation)
        events.emit("ckpt.committed", step=newest, gen=generation)
        if self.on_commit is not None:
            self.on_commit(newest, generation)
        return newest

    def adopt_sealed(self, rank: int, step: int, generation: int, nbytes: int) -> None:
        """A snapshot written into the rank's segment by the agent itself (seeded from the durable tier)."""
        with self._lock:
            self._shards[rank].sealed[step] = (generation, nbytes)
            if self._committed is None or step > self._committed[0]:
                if all(step in self._shards[r].sealed for r in self._ranks if r in self._shards):
                    self._committed = (step, generation)

    def committed_step(self) -> int | None:
        with self._lock:
            return None if self._committed is None else self._committed[0]

    def prepare_restore(self, rank: int) -> RestoreSource | None:
        with self._lock:
            if self._committed is None:
                return None
            step, _ = self._committed
            shard = self._shards.get(rank)
            if shard is None or step not in shard.sealed:
                # after a world-size change: data-parallel state is the same on every rank, take any copy
                others = [(r, s) for r, s in sorted(self._shards.items()) if step in s.sealed]
                if not others:
                    return None
                rank, shard = others[0]
            generation, _nbytes = shard.sealed[step]
            return RestoreSource(step=step, generation=generation, segment=shard.name, source_rank=rank,
                                 origin="local", world_size=self._world_size)

    def segments(self) -> dict[int, str]:
        with self._lock:
            return {r: s.name for r, s in self._shards.items()}

    def close(self, unlink: bool = True) -> None:
        with self._lock:
            shards, self._shards = list(self._shards.values()), {}
        for shard in shards:
            if unlink:
                shard.segment.unlink()
            else:
                shard.segment.close()
