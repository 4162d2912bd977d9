"""The agent's side of the durable tier (``--persist-dir``): persist committed snapshots held on this node
every ``--persist-every`` steps (in the background), on SIGTERM and at job end (synchronously), and seed
this node's segments from the newest complete checkpoint when a job starts with nothing in memory.

One node (``LocalSnapshots``): this node holds every rank's shard and writes whole checkpoints with the
``Persister``. Several nodes (the ``ShardManager`` behind the agent's adapter, which has ``.manager``):
``resilient.replication.durable.ShardedPersist`` has each agent write its own shards and the agent of
group rank 0 commit the manifest; it also restores from disk when no copy in memory is left.
``persist.done`` / ``persist.failed`` events report each attempt.
"""

from __future__ import annotations

import errno as errno_mod

from resilient import events
from resilient.errors import PersistError, ResilientError
from resilient.logs import get_logger

log = get_logger(__name__)


class Durable:
    def __init__(self, directory: str, job: str, keep: int, every: int) -> None:
        self.directory = directory
        self.job = job
        self.keep = keep
        self.every = every
        self._persister = None
        self._sharded = None
        self._last: int | None = None

    def _sharded_for(self, snapshots):
        """The multi-node persister, when ``snapshots`` is the ShardManager adapter (else None)."""
        manager = getattr(snapshots, "manager", None)
        if manager is None:
            return None
        if self._sharded is None:
            from resilient.replication.durable import ShardedPersist

            self._sharded = ShardedPersist(manager, self.directory, job=self.job, keep=self.keep, every=self.every)
        return self._sharded

    def _local(self):
        if self._persister is None:
            from resilient.persist import Persister

            self._persister = Persister(self.directory, job=self.job, keep=self.keep,
                                        on_committed=lambda m: events.emit("persist.done", step=m.step,
                                                                           dir=self.directory))
        return self._persister

    def _shards(self, snapshots, step: int, ranks: tuple[int, ...]):
        from resilient.store import Segment

        segments = snapshots.segments() if hasattr(snapshots, "segments") else {}
        if any(r not in segments for r in ranks):
            return None
        out = {}
        for rank in ranks:
            seg = Segment.open(segments[rank])
            try:
                out[rank] = seg.read(step=step, verify=True)
            finally:
                seg.close()
        return out

    def maybe_persist(self, snapshots, ranks: tuple[int, ...], world_size: int, generation: int, *,
                      final: bool) -> None:
        sharded = self._sharded_for(snapshots)
        if sharded is not None:
            sharded.tick(final=final)
            return
        step = snapshots.committed_step()
        if step is None or step == self._last:
            return
        if not final and (self.every <= 0 or (self._last is not None and step - self._last < self.every)):
            return
        if len(ranks) != world_size:
            if final:
                log.info("not persisting step %d: this node holds %d of %d ranks", step, len(ranks), world_size)
            return
        try:
            shards = self._shards(snapshots, step, ranks)
            if shards is None:
                return
            if final:
                self._local().persist(step, generation, world_size, shards)
            else:
                self._local().submit(step, generation, world_size, shards)
                events.emit("persist.submitted", step=step, dir=self.directory)
            self._last = step
        except (ResilientError, OSError) as exc:
            code = getattr(exc, "errno", None) or getattr(exc.__cause__, "errno", None)
            events.emit("persist.failed", step=step, errno=errno_mod.errorcode.get(code, code) if code else None,
                        error=str(exc))
            log.warning("persisting step %d failed: %s", step, exc)

    def seed(self, snapshots, ranks: tuple[int, ...], world_size: int) -> int | None:
        """Load the newest complete checkpoint into this node's segments; returns its step (None: none)."""
        from resilient.persist import latest_complete, load
        from resilient.store import Segment

        if self._sharded_for(snapshots) is not None:
            return None  # restored lazily: the ShardManager falls back to the durable tier per rank
        manifest = latest_complete(self.directory)
        if manifest is None:
            return None
        states = load(manifest)
        if len(states) != world_size or not hasattr(snapshots, "adopt_sealed"):
            log.warning("checkpoint of step %d has %d ranks, this job %d: not seeded", manifest.step, len(states),
                        world_size)
            return None
        for rank in ranks:
            st = states[rank]
            nbytes = sum(t.numel() * t.element_size() for t in st.tensors.values()) + len(st.meta)
            name = snapshots.segment_for(rank, nbytes)
            seg = Segment.open(name)
            try:
                seg.write(dict(st.tensors), step=st.step, generation=st.generation, meta=bytes(st.meta))
                seg.seal()
            finally:
                seg.close()
            snapshots.adopt_sealed(rank, st.step, st.generation, nbytes)
        log.info("resuming from the durable checkpoint of step %d in %s", manifest.step, self.directory)
        events.emit("restore.plan", rank=None, step=manifest.step, origin="durable")
        return manifest.step

    def close(self) -> None:
        if self._sharded is not None:
            self._sharded.close()
            self._sharded = None
        if self._persister is None:
            return
        try:
            self._persister.close(wait=True)
        except PersistError as exc:
            log.warning("closing the persister: %s", exc)
