"""The agent's side of the durable tier (``--persist-dir``): persist committed snapshots held on this node
every ``--persist-every`` steps (in the background), on SIGTERM and at job end (synchronously), and seed
this node's segments from the newest complete checkpoint when a job starts with nothing in memory.

Cadence (``resilient.persist.cadence``). The agent looks at the committed step once per monitor tick
(``--monitor-interval``, 0.1 s by default) and persists it once it reaches the next multiple of
``--persist-every`` after the last step persisted (the first committed step it sees is persisted when
nothing was yet; a job seeded from disk counts the seeded step as persisted). Only the newest committed
snapshot is held in memory, so when steps are faster than the tick the step persisted is the first one
seen past the multiple (said once at INFO). A persist that is due while the previous one is still being
written waits in a queue of one; a newer due step replaces it there (INFO log, ``persist.superseded``).

Seeding never starts a job from scratch over committed work: a newer damaged checkpoint is set aside
(renamed, never deleted, see ``resilient.persist.reader.set_aside``) when an older one loads; when every
committed checkpoint is damaged, or the newest one was written by a job of another world size, ``seed``
raises ``PersistError`` naming each directory and what to do.

One node (``LocalSnapshots``): this node holds every rank's shard and writes whole checkpoints with the
``Persister``. Several nodes (the ``ShardManager`` behind the agent's adapter, which has ``.manager``):
``resilient.replication.durable.ShardedPersist`` has each agent write its own shards and the agent of
group rank 0 commit the manifest; it also restores from disk when no copy in memory is left.
``persist.done`` / ``persist.failed`` events report each attempt; ``summary_line`` says, for the exit
summary, which checkpoint is on disk and whether the last persist failed.
"""

from __future__ import annotations

import threading

from resilient import events
from resilient.errors import PersistError, ResilientError
from resilient.logs import get_logger
from resilient.persist import cadence
from resilient.persist.outcome import PersistAttempt, describe_failure, errno_name, newest_attempt

log = get_logger(__name__)


def summary_text(directory: str, newest_step: int | None, last: PersistAttempt | None, damaged: int = 0) -> str:
    """The exit summary's durable line: the newest checkpoint on disk (``damaged``: how many committed ones
    there fail their manifest or size check, said when none is intact), and the last persist if it failed."""
    if newest_step is not None:
        text = f"step {newest_step} in {directory}"
    elif damaged:
        text = f"none intact in {directory} ({damaged} damaged, see the warnings above)"
    else:
        text = f"none in {directory}"
    if last is not None and last.error is not None:
        which = f"the final persist of step {last.step}" if last.final else f"the last persist, of step {last.step},"
        text += f" ({which} failed: {last.error})"
    return text


class Durable:
    def __init__(self, directory: str, job: str, keep: int, every: int) -> None:
        self.directory = directory
        self.job = job
        self.keep = keep
        self.every = every
        self._persister = None
        self._sharded = None
        self._last: int | None = None  # last step handed to the persister
        self._lock = threading.Lock()
        self._attempt: PersistAttempt | None = None  # newest attempt to finish (by step, then final over background)
        self._told_cadence = False

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

    def _record(self, attempt: PersistAttempt) -> None:
        with self._lock:
            self._attempt = newest_attempt(self._attempt, attempt)

    def _on_done(self, step: int, future) -> None:
        if future.cancelled():
            return  # superseded by a newer step (the persister logged it)
        exc = future.exception()
        self._record(PersistAttempt(step, False, describe_failure(exc) if exc is not None else None))

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

    def _due(self, step: int) -> bool:
        """Whether a background persist of committed ``step`` is due (see the module doc's cadence)."""
        if not cadence.persist_due(step, self._last, self.every):
            return False
        late = cadence.late(step, self._last, self.every)
        if late:
            say = log.debug if self._told_cadence else log.info
            say("persisting step %d: step %d was due (--persist-every %d), but the agent sees the committed step "
                "once per monitor tick and only the newest committed snapshot is in memory, so the steps in between "
                "are not persisted%s", step, step - late, self.every,
                "" if self._told_cadence else " (said once; later ones at DEBUG)")
            self._told_cadence = True
        return True

    def maybe_persist(self, snapshots, ranks: tuple[int, ...], world_size: int, generation: int, *,
                      final: bool) -> None:
        sharded = self._sharded_for(snapshots)
        if sharded is not None:
            sharded.tick(final=final)
            return
        step = snapshots.committed_step()
        if step is None:
            return
        if final:
            with self._lock:
                done = self._attempt is not None and self._attempt.step == step and self._attempt.error is None
            if done:
                return
        elif not self._due(step):  # never the step persisted last: the next one is due at a later multiple
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
                self._record(PersistAttempt(step, True))
            else:
                future = self._local().submit(step, generation, world_size, shards)
                future.add_done_callback(lambda f, s=step: self._on_done(s, f))
                events.emit("persist.submitted", step=step, dir=self.directory)
            self._last = step
        except (ResilientError, OSError) as exc:
            events.emit("persist.failed", step=step, errno=errno_name(exc), error=str(exc))
            log.warning("persisting step %d failed: %s", step, exc)
            self._record(PersistAttempt(step, final, describe_failure(exc)))

    def seed(self, snapshots, ranks: tuple[int, ...], world_size: int) -> int | None:
        """Load the newest complete checkpoint into this node's segments; returns its step (None: nothing
        committed in the persist directory). Newer damaged checkpoints are set aside. ``PersistError`` when
        committed checkpoints exist but none can be used: the job must not start from scratch over them."""
        from resilient.persist.reader import find_resumable
        from resilient.store import Segment

        if self._sharded_for(snapshots) is not None:
            return None  # restored lazily: the ShardManager falls back to the durable tier per rank
        found = find_resumable(self.directory, "the job", load_states=True, set_aside_damaged=True)
        manifest, states = found.manifest, found.states
        if manifest is None:
            return None
        if len(states) != world_size:
            raise PersistError(
                f"The newest checkpoint in {found.location}, step {manifest.step} at {manifest.location}, was written "
                f"by a job of world size {manifest.world_size}; this job has world size {world_size}, and one node "
                f"cannot resume it with another. It does not start from scratch over it either: run with world size "
                f"{manifest.world_size} (--nproc-per-node), or point --persist-dir at a fresh directory."
            )
        if not hasattr(snapshots, "adopt_sealed"):
            log.warning("checkpoint of step %d not seeded: this node's snapshot store cannot adopt it", manifest.step)
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
        self._last = manifest.step  # on disk already: the next background persist is at the next multiple
        log.info("resuming from the durable checkpoint of step %d in %s", manifest.step, self.directory)
        events.emit("restore.plan", rank=None, step=manifest.step, origin="durable")
        return manifest.step

    def summary_line(self) -> str:
        """For the exit summary: the newest checkpoint on disk and, if the last persist failed, why."""
        from resilient.persist import open_storage
        from resilient.persist.reader import committed_dirs, first_readable

        last = self._sharded.last_attempt() if self._sharded is not None else self._attempt
        try:
            storage = open_storage(self.directory)
            committed = committed_dirs(storage, quiet=True)
            newest = first_readable(storage, committed)
            damaged = len(committed) if newest is None else 0  # none reads: every committed one is damaged
        except (OSError, ResilientError) as exc:
            return f"unknown in {self.directory} (it cannot be listed: {exc})"
        return summary_text(self.directory, newest.step if newest is not None else None, last, damaged)

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
