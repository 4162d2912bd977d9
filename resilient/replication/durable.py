"""``ShardedPersist``: the durable tier when several agents hold the shards (``--persist-dir`` with more
than one node): per-shard persistence coordinated through etcd, and restore from disk.

Roles. The *committer* is the agent of group rank 0 of the current generation. Every ``every`` committed
steps (and on SIGTERM / at job end) it publishes ``persisted/request`` = that committed step, fenced by
its generation. Every agent watches the key and writes the shards of that step it is the writer of (the
first holder named in the shard manifest that is a member now: the owner while it lives) with
``write_shard``, from a private copy taken from its verified segment at once (a worker may overwrite the
slot later), and records the result under ``persisted/shards/<step>/<rank>`` (the shard's manifest entry,
or the error with its errno), fenced by the request's generation. The committer waits for every rank's
result: all written -> ``commit_manifest`` (the commit point), ``persisted/latest`` (fenced), retention,
events ``persist.commit`` and ``persist.done``; any failure or time-out -> ``persist.failed`` (errno of
the cause, e.g. ENOSPC), the partial step directory is removed and the previous checkpoint stays latest.
Training never waits: files are written by one background thread per agent (synchronously only for the
final persist at SIGTERM / job end).

Restore (``restore``, installed as the ShardManager's ``durable_fallback``): the newest complete
checkpoint, the rank's shard (``rank % world_size`` of the checkpoint after a world-size change), verified
against its crc32s, copied into a local segment; origin ``durable``. A committed checkpoint found damaged
(manifest, sizes, or this rank's crc32s) is set aside (renamed ``step-N.corrupt-<time>-<id>``, never
deleted; any agent may do it: the rename is atomic, a second one finds it gone, see
``resilient.persist.reader.set_aside``) and never silently replaced by a fresh start: a shard that fails
its crc32 fails the rank's restore with the cause (the generation restarts, and every rank then restores
the same older checkpoint), and when every committed checkpoint is damaged the restore fails naming them.

Cadence (``resilient.persist.cadence``): the committer requests a persist at a monitor tick once the
committed step reaches the next multiple of ``every`` after the last requested (or persisted) one; while a
round is in flight, due steps are not requested (INFO log, once per round) and the first tick after it
requests the newest committed step. A request can name a step already
superseded (the committer's view of the committed step lags; a newer commit drops the older step's shard
manifests, and with them every agent's way to tell which shards it writes): the agents that find the
manifests gone say so in the step's results (create-only), and the round ends at once with
``persist.superseded`` instead of waiting ``wait_s`` for shards nobody writes.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from dataclasses import dataclass

from resilient import events
from resilient import failpoints as fp_mod
from resilient.errors import (
    CheckpointCorruptError,
    EtcdError,
    FencedError,
    PersistError,
    ResilientError,
    StoreError,
)
from resilient.etcd.api import Compare, Put, WatchEvent
from resilient.logs import get_logger
from resilient.persist import cadence
from resilient.persist.fs import open_storage
from resilient.persist.manifest import (
    MANIFEST_NAME,
    Manifest,
    shard_entry_from_dict,
    shard_entry_to_dict,
    step_dir_name,
)
from resilient.persist.outcome import PersistAttempt, errno_name, newest_attempt
from resilient.persist.reader import find_resumable, load, set_aside, what_stays
from resilient.persist.retention import apply_retention, clean_leftovers
from resilient.persist.writer import commit_manifest, resilient_version, write_shard
from resilient.runtime.api import RestoreSource

log = get_logger(__name__)

POLL_S = 0.05


@dataclass(frozen=True)
class Request:
    """What the committer asks every writer to persist."""

    step: int
    generation: int  # generation the snapshot of ``step`` was sealed in
    world_size: int
    fence: int  # generation the request was made in (writes on its behalf are fenced by it)
    by: str

    def encode(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @staticmethod
    def decode(raw: bytes) -> "Request":
        try:
            d = json.loads(raw)
            return Request(int(d["step"]), int(d["generation"]), int(d["world_size"]), int(d["fence"]), str(d["by"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise PersistError(f"Malformed persist request {raw[:200]!r}: {exc}.") from exc


def writer_of(holders, members) -> str | None:
    """The node that writes a shard to disk: its first holder that is still a member."""
    return next((h for h in holders if h in members), None)


class ShardedPersist:
    """See the module docstring. ``tick`` from the agent's monitor loop; ``close`` at the end."""

    def __init__(self, manager, directory: str, *, job: str, keep: int, every: int, wait_s: float = 60.0,
                 failpoints: fp_mod.Registry | str | None = None) -> None:
        self.m = manager
        self.kv, self.keys = manager.kv, manager.keys
        self.node_id = manager.node.node_id
        self.storage = open_storage(directory)
        self.directory = self.storage.location
        self.job, self.keep, self.every, self.wait_s = job, keep, every, wait_s
        self._fp = fp_mod.resolve(failpoints)
        self._cv = threading.Condition()
        self._io = threading.Lock()  # one capture/write/commit at a time (background or final)
        self._tasks: collections.deque = collections.deque()
        self._written: set[tuple[int, int]] = set()  # (step, rank) results this agent published
        self._handled: set[int] = set()  # request steps this agent has acted on
        self._requested: int | None = self._latest_persisted()
        self._inflight = False
        self._closed = False
        self._hurry = False  # a final persist waits: the background round in progress gives up its wait
        self._final_step: int | None = None  # the step of the final persist, once one started
        self._attempt: PersistAttempt | None = None
        self._told_inflight: int | None = None  # the in-flight step a skip was logged for
        self._restore_lock = threading.Lock()
        self._restored: dict[tuple[int, int], RestoreSource] = {}
        self._thread = threading.Thread(target=self._run, name="persist-shards", daemon=True)
        self._thread.start()
        self._watch = self.kv.watch_prefix(self.keys.persist_request, self._on_request_event)
        manager.durable_fallback = self.restore

    # --- state -----------------------------------------------------------------------------------------
    def _latest_persisted(self) -> int | None:
        try:
            kv_ = self.kv.get(self.keys.persisted_latest)
        except EtcdError as exc:
            log.warning("cannot read %s: %s", self.keys.persisted_latest, exc)
            return None
        if kv_ is None:
            return None
        try:
            return int(json.loads(kv_.value)["step"])
        except (ValueError, KeyError, TypeError):
            return None

    def _members(self) -> tuple[int | None, frozenset[str]]:
        return self.m.peer_view()

    def is_committer(self) -> bool:
        a = self.m.current_assignment()
        entry = a.entry(self.node_id) if a is not None else None
        return entry is not None and entry.group_rank == 0

    # --- the committer's trigger -------------------------------------------------------------------------
    def tick(self, *, final: bool) -> None:
        """From the agent's monitor loop (``final``: SIGTERM / job end, synchronous)."""
        c = self.m.committed()
        if c is None:
            return
        if final:
            self._final(c)
            return
        if not self.is_committer() or self.every <= 0:
            return
        with self._cv:
            if not cadence.persist_due(c.step, self._requested, self.every):
                return
            if self._inflight:
                if self._told_inflight != self._requested:
                    self._told_inflight = self._requested
                    log.info("committed step %d is due for a persist (--persist-every %d) but the round for step %s "
                             "is still in flight; the first tick after it ends persists the newest committed step",
                             c.step, self.every, self._requested)
                return
            self._inflight = True
            self._requested = c.step
        req = self._publish_request(c)
        if req is None:
            with self._cv:
                self._inflight = False
            return
        with self._cv:
            self._handled.add(req.step)
            self._tasks.append(("write", req))
            self._tasks.append(("commit", req))
            self._cv.notify()

    def _publish_request(self, c) -> Request | None:
        gen, _ = self._members()
        if gen is None:
            return None
        req = Request(c.step, c.generation, c.world_size, gen, self.node_id)
        try:
            self.m.rendezvous.fenced_txn(gen, [], [Put(self.keys.persist_request, req.encode())])
        except (FencedError, EtcdError) as exc:
            log.info("persist request for step %d not published: %s", c.step, exc)
            return None
        return req

    def _final(self, c) -> None:
        latest = self._latest_persisted()
        if latest is not None and latest >= c.step:
            return
        committer = self.is_committer()
        req = self._publish_request(c) if committer else None
        if req is None:
            gen, _ = self._members()
            req = Request(c.step, c.generation, c.world_size, gen or 0, self.node_id)
        self._hurry = True
        self._final_step = req.step
        try:
            with self._io:
                self._hurry = False
                latest = self._latest_persisted()
                if latest is not None and latest >= c.step:
                    return  # the background round in progress persisted it meanwhile
                with self._cv:
                    self._handled.add(req.step)
                self._write(req)
                if committer:
                    self._commit(req, wait_s=min(self.wait_s, 30.0))
        finally:
            self._hurry = False

    # --- every agent: requests -----------------------------------------------------------------------------
    def _on_request_event(self, event: WatchEvent) -> None:
        if event.type != "put" or event.key != self.keys.persist_request:
            return
        try:
            req = Request.decode(event.value)
        except PersistError as exc:
            log.warning("%s", exc)
            return
        with self._cv:
            if req.step in self._handled or self._closed:
                return
            self._handled.add(req.step)
            self._tasks.append(("write", req))
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._tasks and not self._closed:
                    self._cv.wait()
                if not self._tasks:
                    return
                what, req = self._tasks.popleft()
            with self._io:
                try:
                    if what == "write":
                        self._write(req)
                    else:
                        self._commit(req, wait_s=self.wait_s)
                except (ResilientError, OSError) as exc:
                    # etcd (an election, a deadline), the store or the storage: this round is lost, the thread
                    # lives on and the next request persists a newer step
                    log.warning("persist %s of step %d failed (%s: %s); waiting for the next request", what,
                                req.step, type(exc).__name__, exc)
                    self._record(req.step, f"{type(exc).__name__}: {exc}")
                    events.emit("persist.failed", step=req.step, errno=errno_name(exc),
                                error=f"{type(exc).__name__}: {exc}", dir=self.directory)
                finally:
                    if what == "commit":
                        with self._cv:
                            self._inflight = False

    # --- writing shards --------------------------------------------------------------------------------------
    def _mine(self, req: Request) -> tuple[list[int], list[int]]:
        """The ranks of ``req.step`` this agent writes, and the ranks whose shard manifest is gone."""
        from resilient.replication.commit import read_manifests

        _, members = self._members()
        manifests = read_manifests(self.kv, self.keys, req.generation, req.step)
        mine = sorted(r for r, m in manifests.items() if writer_of(m.holders, members) == self.node_id)
        return mine, [r for r in range(req.world_size) if r not in manifests]

    def _capture(self, rank: int, req: Request):
        for seg, _slot in self.m.local.find(rank, req.step, req.generation):
            try:
                return seg.read(step=req.step, verify=True)
            except StoreError as exc:
                log.warning("rank %d step %d in %s cannot be persisted from here: %s", rank, req.step, seg.name, exc)
        return None

    def _write(self, req: Request) -> None:
        try:
            ranks, gone = self._mine(req)
        except (EtcdError, ResilientError) as exc:
            log.warning("cannot tell which shards of step %d to persist: %s", req.step, exc)
            return
        if gone:
            # the committer's view of the committed step lagged: a newer commit already dropped these ranks'
            # manifests, so no agent can tell it writes them. Said once per rank (create-only, never over a
            # shard another agent wrote), the committer ends the round now instead of waiting for them.
            log.info("step %d was superseded before it could be persisted (ranks %s have no manifest any more); "
                     "the next due step is persisted", req.step, gone)
            for rank in gone:
                self._result(req, rank, {"ok": False, "errno": None, "superseded": True,
                                         "error": f"step {req.step} was superseded: a newer step was committed "
                                                  "before its shards were written"}, only_if_absent=True)
        directory = step_dir_name(req.step)
        for rank in ranks:
            if (req.step, rank) in self._written:
                continue
            shard = self._capture(rank, req)
            if shard is None:
                self._result(req, rank, {"ok": False, "errno": None,
                                         "error": f"{self.node_id} no longer holds rank {rank}'s step {req.step}"})
                continue
            t0 = time.monotonic()
            try:
                if self.storage.exists(f"{directory}/{MANIFEST_NAME}"):
                    return
                self.storage.makedirs(directory)
                entry = write_shard(self.storage, directory, rank, shard, failpoints=self._fp)
            except (OSError, ResilientError) as exc:
                code = errno_name(exc)
                events.emit("persist.failed", step=req.step, rank=rank, errno=code, error=f"{type(exc).__name__}: {exc}",
                            dir=self.directory)
                log.warning("persisting rank %d of step %d failed: %s", rank, req.step, exc)
                self._record(req.step, f"rank {rank}: {code + ': ' if code else ''}{exc}")
                self._result(req, rank, {"ok": False, "errno": code, "error": str(exc)})
                continue
            events.emit("persist.shard", step=req.step, rank=rank, bytes=entry.bytes,
                        seconds=round(time.monotonic() - t0, 6))
            self._result(req, rank, {"ok": True, "node": self.node_id, "entry": shard_entry_to_dict(entry)})

    def _result(self, req: Request, rank: int, body: dict, *, only_if_absent: bool = False) -> None:
        key = self.keys.persist_shard(req.step, rank)
        compares = [Compare(key, "version", "==", 0)] if only_if_absent else []
        try:
            self.m.rendezvous.fenced_txn(req.fence, compares, [Put(key, json.dumps(body).encode())])
        except (FencedError, EtcdError) as exc:
            log.info("result for rank %d of step %d not recorded: %s", rank, req.step, exc)
            return
        self._written.add((req.step, rank))

    # --- the committer: manifest --------------------------------------------------------------------------
    def _collect(self, req: Request, wait_s: float) -> tuple[dict[int, dict], str | None]:
        deadline = time.monotonic() + wait_s
        while True:
            items, _ = self.kv.get_prefix(self.keys.persist_step_prefix(req.step))
            results = {}
            for item in items:
                try:
                    results[int(item.key.rsplit("/", 1)[1])] = json.loads(item.value)
                except (ValueError, IndexError):
                    continue
            bad = {r: b for r, b in results.items() if not b.get("ok")}
            if bad:
                r, b = min(bad.items())
                return results, f"rank {r}: {b.get('error')}"
            if all(r in results for r in range(req.world_size)):
                return results, None
            gen, _ = self._members()
            if gen != req.fence:
                return results, f"generation {req.fence} ended before every shard was written"
            if time.monotonic() >= deadline or self._closed or self._hurry:
                missing = [r for r in range(req.world_size) if r not in results]
                why = ("the final persist took over" if self._hurry else "the agent closed" if self._closed
                       else f"{wait_s:g}s passed")
                return results, f"ranks {missing} were not written before {why}"
            time.sleep(POLL_S)

    def _commit(self, req: Request, wait_s: float) -> None:
        directory = step_dir_name(req.step)
        t0 = time.monotonic()
        try:
            results, problem = self._collect(req, wait_s)
        except EtcdError as exc:
            results, problem = {}, f"etcd: {exc}"
        if problem is None and self._members()[0] != req.fence:
            problem = f"generation {req.fence} is no longer current"
        if problem is not None:
            bad = [b for b in results.values() if not b.get("ok")]
            if bad and all(b.get("superseded") for b in bad):
                self._superseded(req, directory)
                return
            code = next((b.get("errno") for b in bad if b.get("errno")), None)
            self._fail(req, directory, code, problem)
            return
        try:
            entries = tuple(shard_entry_from_dict(results[r]["entry"], where=f"rank {r}") for r in range(req.world_size))
            import torch

            manifest = Manifest(job=self.job, step=req.step, generation=req.generation, world_size=req.world_size,
                                created=time.time(), torch_version=torch.__version__,
                                resilient_version=resilient_version(), shards=entries)
            bound = commit_manifest(self.storage, directory, manifest, failpoints=self._fp)
        except (OSError, ResilientError) as exc:
            self._fail(req, directory, errno_name(exc), f"{type(exc).__name__}: {exc}")
            return
        seconds = time.monotonic() - t0
        latest = json.dumps({"step": req.step, "generation": req.generation, "location": bound.location}).encode()
        try:
            self.m.rendezvous.fenced_txn(req.fence, [], [Put(self.keys.persisted_latest, latest)])
        except (FencedError, EtcdError) as exc:
            log.warning("checkpoint of step %d is complete at %s but %s was not updated: %s", req.step,
                        bound.location, self.keys.persisted_latest, exc)
        events.emit("persist.commit", step=req.step, generation=req.generation, bytes=bound.total_bytes,
                    seconds=round(seconds, 6), location=bound.location, shards=req.world_size)
        log.info("persisted step %d (%d shards, %d bytes) to %s", req.step, req.world_size, bound.total_bytes,
                 bound.location)
        self._record(req.step, None)
        self._tidy(req.step)
        events.emit("persist.done", step=req.step, dir=self.directory)  # the round is over: all of it is visible

    def _record(self, step: int, error: str | None) -> None:
        attempt = PersistAttempt(step, step == self._final_step, error)
        with self._cv:
            self._attempt = newest_attempt(self._attempt, attempt)

    def last_attempt(self) -> PersistAttempt | None:
        """The newest persist round this agent committed, failed, or failed to write its shards for."""
        with self._cv:
            return self._attempt

    def _fail(self, req: Request, directory: str, code: str | None, problem: str) -> None:
        log.warning("persisting step %d failed (%s); %s", req.step, problem,
                    what_stays(self.storage, self.directory))
        self._record(req.step, f"{code}: {problem}" if code else problem)
        self._end_unfinished(req, directory)
        # the round is over (its directory removed, the tidy-up done): what the event reports is all visible
        events.emit("persist.failed", step=req.step, errno=code, error=problem, dir=self.directory)

    def _superseded(self, req: Request, directory: str) -> None:
        """The round ends without a checkpoint and without a failure: its step was superseded before its shards
        were written (see ``_write``); the next due step is persisted."""
        by = self.m.committed()
        log.info("step %d was not persisted: step %s was committed before its shards were written; the next due "
                 "step is persisted", req.step, by.step if by is not None else "-")
        self._end_unfinished(req, directory)
        events.emit("persist.superseded", step=req.step, by_step=by.step if by is not None else None,
                    dir=self.directory)

    def _end_unfinished(self, req: Request, directory: str) -> None:
        """A round that wrote no manifest: remove what it wrote, then the tidy-up."""
        try:
            if not self.storage.exists(f"{directory}/{MANIFEST_NAME}"):
                self.storage.remove_tree(directory)
        except OSError as exc:
            log.warning("could not remove the unfinished checkpoint %s: %s", directory, exc)
        self._tidy(req.step)

    def _tidy(self, step: int) -> None:
        """Drop the results of this and older rounds; retention; leftovers of abandoned rounds."""
        try:
            items, _ = self.kv.get_prefix(self.keys.persist_shards_prefix)
            for item in items:
                parts = item.key[len(self.keys.persist_shards_prefix):].split("/")
                if parts and parts[0].isdigit() and int(parts[0]) <= step:
                    self.kv.delete(item.key)
        except EtcdError as exc:
            log.info("persist results not cleared: %s", exc)
        try:
            deleted = apply_retention(self.storage, self.keep, failpoints=self._fp)
            if deleted:
                events.emit("persist.retention", step=step, deleted=deleted, keep=self.keep)
            # only this round's step and older ones: another host may be writing a newer request's shard now
            # (removing that directory made a later manifest name a shard that was gone)
            clean_leftovers(self.storage, up_to_step=step)
        except OSError as exc:
            log.warning("retention after step %d failed: %s", step, exc)

    # --- restore -------------------------------------------------------------------------------------------
    def restore(self, rank: int, assignment, reason: str) -> RestoreSource | None:
        """Rank ``rank``'s state from the newest complete checkpoint, in a local segment (None: none)."""
        with self._restore_lock:
            found = find_resumable(self.storage, f"rank {rank}", verify=False, set_aside_damaged=True)
            manifest = found.manifest
            if manifest is None:
                return None
            source = rank if manifest.world_size == assignment.world_size else rank % manifest.world_size
            cached = self._restored.get((manifest.step, source))
            if cached is not None and self.m.local.find(source, cached.step, cached.generation):
                return cached
            t0 = time.monotonic()
            try:
                state = load(manifest, source, verify=True)[source]
            except OSError as exc:
                raise PersistError(
                    f"Rank {rank} cannot be restored: reading its shard of the durable checkpoint {manifest.location} "
                    f"failed ({type(exc).__name__}: {exc}). Fix the storage; the restore is tried again with the "
                    f"next generation."
                ) from exc
            except CheckpointCorruptError as exc:
                events.emit("ckpt.verify_failed", rank=source, step=manifest.step, holder="durable", detail=str(exc))
                moved = set_aside(self.storage, manifest.directory, str(exc), step=manifest.step)
                if moved is None and not self.storage.exists(f"{manifest.directory}/{MANIFEST_NAME}"):
                    moved = "another agent found it damaged too"  # set aside (or removed) by someone else
                then = (f"It was set aside ({moved}); the ranks are never resumed from different steps, so this "
                        f"generation fails and the next one restores every rank from the newest older checkpoint."
                        if moved else
                        f"It could not be set aside (see the warning before this one): move it out of "
                        f"{self.directory}; until then every restore from disk fails on it.")
                raise CheckpointCorruptError(
                    f"Rank {rank} cannot be restored from the durable checkpoint {manifest.location}: {exc} {then}"
                ) from exc
            nbytes = sum(t.numel() * t.element_size() for t in state.tensors.values()) + len(state.meta)
            seg = self.m.local.ensure(source, own=False, nbytes=nbytes + nbytes // 8 + (1 << 20), keep=self.m._keep())
            seg.write(dict(state.tensors), step=state.step, generation=state.generation, meta=bytes(state.meta))
            seg.seal()
            src = RestoreSource(step=manifest.step, generation=manifest.generation, segment=seg.name,
                                source_rank=source, origin="durable", world_size=manifest.world_size)
            self._restored[(manifest.step, source)] = src
        log.info("rank %d restores step %d from the durable checkpoint %s (%s)", rank, manifest.step,
                 manifest.location, reason)
        events.emit("restore.plan", rank=rank, step=manifest.step, origin="durable", source_rank=source,
                    seconds=round(time.monotonic() - t0, 6), reason=reason)
        return src

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join()
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self.m.durable_fallback == self.restore:
            self.m.durable_fallback = None


__all__ = ["Request", "ShardedPersist", "writer_of"]
