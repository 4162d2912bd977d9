"""The Persister: writes checkpoints off the training path, one at a time, then applies retention.

``submit`` hands a committed snapshot to a background thread and returns a ``Future`` at once. The queue
is bounded (``queue_size``, default 1): when it is full, the oldest pending checkpoint is superseded
(its Future is cancelled, a ``persist.superseded`` event is emitted), because a newer committed step makes
an older pending one pointless and training must never wait for the disk. The tensors handed over must
stay unchanged until the Future is done (a sealed snapshot slot that the caller holds).

``persist`` does the same synchronously in the caller's thread (for SIGTERM and job end): it supersedes
pending older steps and waits for the write in progress.

After each commit: ``on_committed(manifest)`` (the agent moves ``persisted/latest`` in etcd there), then
retention. Events: ``persist.begin``, ``persist.commit``, ``persist.failed`` (with ``errno`` when an
OS error caused it, e.g. ``ENOSPC``), ``persist.superseded``, ``persist.retention``; each is also passed
to ``on_event``. A failed persist removes what it wrote and leaves earlier checkpoints as they were.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from resilient import events
from resilient import failpoints as fp_mod
from resilient.errors import ConfigError, PersistError
from resilient.logs import get_logger
from resilient.persist.fs import Storage, open_storage
from resilient.persist.manifest import Manifest
from resilient.persist.outcome import errno_name, os_error_behind
from resilient.persist.reader import what_stays
from resilient.persist.retention import apply_retention, clean_leftovers
from resilient.persist.writer import ShardLike, write_checkpoint

log = get_logger(__name__)


@dataclass(frozen=True)
class PersistConfig:
    """Settings of a Persister, validated at construction."""

    directory: str
    job: str
    keep: int = 3
    queue_size: int = 1
    max_workers: int = 4
    background_nice: int = 10  # niceness of the background writer threads (0: same as training)

    def __post_init__(self) -> None:
        if not self.directory:
            raise ConfigError("The persist directory is empty; pass a local path or a URL such as s3://bucket/prefix.")
        if not self.job:
            raise ConfigError("The job name of a Persister is empty; pass job=<the job id>.")
        if self.keep < 1:
            raise ConfigError(f"keep={self.keep}: a Persister must keep at least 1 checkpoint (--keep >= 1).")
        if self.queue_size < 1:
            raise ConfigError(f"queue_size={self.queue_size}: the pending queue needs room for at least 1 checkpoint.")
        if self.max_workers < 1:
            raise ConfigError(f"max_workers={self.max_workers}: at least one writer thread is needed.")
        if not 0 <= self.background_nice <= 19:
            raise ConfigError(f"background_nice={self.background_nice} must be between 0 and 19.")


@dataclass
class _Job:
    step: int
    generation: int
    world_size: int
    shards: Mapping[int, ShardLike]
    future: Future


class Persister:
    """Writes checkpoints to a local directory or URL in a background thread (see the module doc)."""

    def __init__(
        self,
        directory: str | Storage,
        *,
        job: str,
        keep: int = 3,
        on_event: Callable[[dict[str, Any]], Any] | None = None,
        on_committed: Callable[[Manifest], Any] | None = None,
        failpoints: fp_mod.Registry | str | None = None,
        queue_size: int = 1,
        max_workers: int = 4,
        background_nice: int = 10,
        storage_options: dict | None = None,
    ) -> None:
        self.storage = open_storage(directory, **(storage_options or {}))
        self.config = PersistConfig(self.storage.location, job, keep, queue_size, max_workers, background_nice)
        self._on_event = on_event
        self._on_committed = on_committed
        self._fp = fp_mod.resolve(failpoints)
        self._cond = threading.Condition()
        self._pending: collections.deque[_Job] = collections.deque()
        self._write_lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="resilient-persister", daemon=True)
        self._thread.start()

    # --- public API ----------------------------------------------------------------------------------
    def submit(self, step: int, generation: int, world_size: int, shards: Mapping[int, ShardLike]) -> Future:
        """Queue ``step`` for writing in the background; returns at once with a Future of its Manifest."""
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise PersistError(f"Cannot submit step {step}: the Persister for {self.config.directory} is closed.")
            while len(self._pending) >= self.config.queue_size:
                self._supersede(self._pending.popleft(), by=step)
            self._pending.append(_Job(step, generation, world_size, shards, future))
            self._cond.notify()
        return future

    def persist(self, step: int, generation: int, world_size: int, shards: Mapping[int, ShardLike]) -> Manifest:
        """Write ``step`` now in the calling thread (waits for a write in progress); returns its Manifest."""
        with self._cond:
            if self._closed:
                raise PersistError(f"Cannot persist step {step}: the Persister for {self.config.directory} is closed.")
            keep = collections.deque()
            for job in self._pending:
                if job.step <= step:
                    self._supersede(job, by=step)
                else:
                    keep.append(job)
            self._pending = keep
        with self._write_lock:
            return self._write(_Job(step, generation, world_size, shards, Future()), background=False)

    def clean_leftovers(self) -> list[str]:
        """Remove leftovers of killed persists (safe here: waits for any write in progress)."""
        with self._write_lock:
            return clean_leftovers(self.storage)

    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def close(self, wait: bool = True) -> None:
        """Stop. ``wait``: finish the pending checkpoints first; otherwise cancel them (the write in progress
        still completes). Idempotent."""
        with self._cond:
            if not self._closed:
                self._closed = True
                if not wait:
                    while self._pending:
                        job = self._pending.popleft()
                        job.future.cancel()
                self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def __enter__(self) -> Persister:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close(wait=True)

    # --- internals -----------------------------------------------------------------------------------
    def _emit(self, kind: str, **fields: Any) -> None:
        event = events.emit(kind, job=self.config.job, directory=self.config.directory, **fields)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # a broken observer must not break persistence; say so loudly
                log.exception("on_event callback failed for event %s.", kind)

    def _supersede(self, job: _Job, *, by: int) -> None:
        if job.future.cancel():
            log.info("Checkpoint step %d is not persisted: step %d replaced it while it waited for the write in "
                     "progress (the storage is slower than the persist cadence; training does not wait for it).",
                     job.step, by)
            self._emit("persist.superseded", step=job.step, by_step=by)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                job = self._pending.popleft()
                if not job.future.set_running_or_notify_cancel():
                    continue
            with self._write_lock:
                try:
                    job.future.set_result(self._write(job, background=True))
                except BaseException as exc:  # the Future carries it to whoever waits
                    job.future.set_exception(exc)

    def _lower_priority(self) -> None:
        if self.config.background_nice <= 0:
            return
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.config.background_nice)
        except (OSError, AttributeError) as exc:
            log.debug("Could not lower the persist thread's priority: %s", exc)

    def _write(self, job: _Job, *, background: bool) -> Manifest:
        self._emit("persist.begin", step=job.step, generation=job.generation, world_size=job.world_size,
                   background=background)
        started = time.monotonic()
        try:
            manifest = write_checkpoint(
                self.storage, job.step, job.generation, job.world_size, job.shards,
                job=self.config.job, failpoints=self._fp, max_workers=self.config.max_workers,
                thread_init=self._lower_priority if background else None,
            )
        except Exception as exc:
            os_error = os_error_behind(exc)
            name, code = (errno_name(os_error), os_error.errno) if os_error is not None else (None, None)
            self._emit("persist.failed", step=job.step, error=f"{type(exc).__name__}: {exc}", errno=name,
                       errno_code=code)
            log.error("Persisting step %d to %s failed: %s", job.step, self.config.directory, exc)
            raise PersistError(
                f"Persisting step {job.step} to {self.config.directory} failed ({type(exc).__name__}: {exc}). "
                f"What it wrote was removed; {what_stays(self.storage, self.config.directory)} Free space or fix the "
                f"storage; the next persist will try again."
            ) from exc
        seconds = time.monotonic() - started
        self._emit("persist.commit", step=job.step, generation=job.generation, bytes=manifest.total_bytes,
                   seconds=round(seconds, 6), gbps=round(manifest.total_bytes / seconds / 1e9, 3) if seconds else None,
                   location=manifest.location)
        callback_error: BaseException | None = None
        if self._on_committed is not None:
            try:
                self._on_committed(manifest)
            except Exception as exc:
                callback_error = exc
                self._emit("persist.on_committed_failed", step=job.step, error=f"{type(exc).__name__}: {exc}")
        try:
            deleted = apply_retention(self.storage, self.config.keep, failpoints=self._fp)
        except OSError as exc:
            log.warning("Retention after step %d failed (%s); older checkpoints stay until the next persist.",
                        job.step, exc)
            deleted = []
        if deleted:
            self._emit("persist.retention", step=job.step, deleted=deleted, keep=self.config.keep)
        if callback_error is not None:
            raise PersistError(
                f"Checkpoint step {job.step} is complete at {manifest.location}, but the on_committed callback "
                f"failed ({type(callback_error).__name__}: {callback_error}); the pointer to it was not updated."
            ) from callback_error
        return manifest
