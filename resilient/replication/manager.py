"""``ShardManager``: the node agent's owner of snapshot shards — local segments and their lifetime,
replication to peers, checkpoint commit in etcd, and serving peers' offers, pulls and drops; restore from
whichever copy survived goes through its ``ShardRestorer``.

Flow of one sealed snapshot (``on_sealed``, never blocking the caller): the newest seal of a rank replaces
one still queued (the older one is skipped and counted); a sender thread verifies the slot in place,
writes the shard manifest ``ckpt/<g>/<step>/<rank>`` (fenced by generation), and for each peer that the
placement names: Offer over gRPC (the peer checks generation and placement and makes room without
touching its committed copy), paced by the token bucket, ``send_slot`` over the native bulk transport
(the peer verifies every chunk before it seals), then the manifest gains that holder. Then the commit
check: when every rank of the step has its copies, ``committed`` moves forward in a fenced transaction.
A copy about to be overwritten (the worker's next snapshot, ``before_overwrite``; a peer's next transfer,
``_make_room``) is first withdrawn, here and from its manifest, under the lock this node's commits and
claims hold (``resilient.replication.withdrawn``): no node commits a step on a copy that is going away.
A shard that cannot reach all of its holders within ``replicate_timeout_s`` (peer gone, refused,
generation changed) is skipped: event ``replica.skipped`` and the ``skipped`` counter; training is never
blocked and the previous committed step stays the restore point. A new generation cancels the offer or
bulk send of an older one still in progress (a peer cut off or paused would hold it until its timeout).
An etcd error on the way (an election, a deadline, an indeterminate transaction) retries the snapshot
once while it is still the rank's newest and within its time budget, else skips it with
``cause="etcd"``; the sender threads never die of it, so commits resume with the next snapshot once etcd
answers again.

Restore (``prepare_restore``) is delegated to the ``ShardRestorer`` this manager owns (``restorer``,
``resilient.replication.restorer``); the manager shares with it its lock, its counters and the table of
transfers its bulk receiver expects, and forwards ``stripe_min_bytes`` and ``durable_fallback`` to it.

``start`` binds the peer and bulk ports (port 0 picks free ones) and replaces ``node`` with the bound
addresses (``peer_address``, ``bulk_address``): callers announce ``manager.node`` as it is after ``start``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

from resilient import events
from resilient import failpoints
from resilient.errors import (
    ChecksumError,
    EtcdError,
    FailpointError,
    FencedError,
    ReplicationError,
    StoreError,
    StoreSpaceError,
    TransportError,
)
from resilient.etcd.api import KVStore, WatchEvent, WatchHandle
from resilient.keys import JobKeys
from resilient.logs import get_logger
from resilient.replication import placement as placement_mod
from resilient.replication import slices as slices_mod
from resilient.replication.commit import COMMIT, CommitExecutor, read_commit
from resilient.replication.local import LocalShards, digest_of, receive_target, verify
from resilient.replication.manifest import CommitRecord, ShardManifest
from resilient.replication.peer_service import (
    PeerAuthority,
    PeerClient,
    PeerHandler,
    PeerRefused,
    PeerServicer,
    PeerTLS,
    Sender,
    start_server,
)
from resilient.replication.ratelimit import Pacer
from resilient.replication.restorer import Expected, ShardRestorer
from resilient.replication.settings import ReplicationSettings
from resilient.replication.withdrawn import Withdrawn
from resilient.runtime.api import OverwriteAnswer, RestoreSource
from resilient.store.transport import BulkReceiver, SlotHeader, send_slot
from resilient._proto import peer_pb2 as pb

log = get_logger(__name__)


def split_hostport(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ReplicationError(f"Address {address!r} is not host:port.")
    return host, int(port)


@dataclass
class _Job:
    rank: int
    step: int
    generation: int
    nbytes: int
    queued_at: float


@dataclass
class Stats:
    sent_bytes: int = 0
    sent_shards: int = 0
    received_bytes: int = 0
    skipped: int = 0
    committed: int = 0
    verify_failed: int = 0
    restored_bytes: int = 0


def _abort(sock: socket.socket) -> None:
    """Abort a bulk send of a generation that is over: its peer may be paused or cut off, and the send would
    otherwise block up to ``replicate_timeout_s``, holding back every newer snapshot of its rank."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class ShardManager(PeerHandler):
    """See the module docstring. Thread-safe; ``start`` before use, ``close`` at the end."""

    def __init__(
        self,
        kv: KVStore,
        keys: JobKeys,
        node,
        *,
        replicas: int,
        token: bytes,
        rendezvous,
        shm_dir: str | None = None,
        rate_limit_bps: float | None = None,
        settings: ReplicationSettings | None = None,
    ) -> None:
        self.kv = kv
        self.keys = keys
        self.node = node
        self.token = bytes(token)
        self.rendezvous = rendezvous
        self.settings = settings or ReplicationSettings.resolve(replicas, rate_limit_bps)
        self.local = LocalShards(keys.job, node.node_id, shm_dir)
        self.executor = CommitExecutor(kv, keys, rendezvous)
        self.authority = PeerAuthority(keys.job, node.node_id, self.token)
        self.tls = PeerTLS.from_env()  # optional mTLS of the peer control channel
        self.client = PeerClient(self.authority, self._gen_or_zero, self.settings.rpc_timeout_s, self.settings.max_message_bytes,
                                 tls=self.tls)
        self.stats = Stats()
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        # held from checking this node's copies to publishing a claim on them (a manifest) or a commit, and
        # while a copy about to be overwritten is withdrawn (``resilient.replication.withdrawn``); taken
        # before ``_lock``, never after it
        self._copies = threading.RLock()
        self._withdrawn = Withdrawn()
        self.local.on_drop = self._withdrawn.forget
        self._assignment = None
        self._placement: placement_mod.Placement | None = None
        self._committed: CommitRecord | None = None
        self._pending: dict[int, _Job] = {}
        self._order: list[int] = []
        self._active: set[int] = set()
        # rank -> (generation, cancel) of the offer or bulk send in progress: a new generation cancels older ones
        self._sending: dict[int, tuple[int, Callable[[], object]]] = {}
        self._expect: dict[tuple[int, int, int], Expected] = {}  # transfers the bulk receiver accepts
        # paces every piece of every transfer (``send_slot(..., pace=...)``), so a big shard is paced inside
        # its transfer rather than bursting at line rate
        self._pace = (
            Pacer(self.settings.rate_limit_bps, self.settings.rate_limit_bps * 0.25)
            if self.settings.rate_limit_bps
            else None
        )
        self._stop = False
        self._threads: list[threading.Thread] = []
        self._server = None
        self._receiver: BulkReceiver | None = None
        self._watch: WatchHandle | None = None
        self.peer_address: str | None = None
        self.bulk_address: str | None = None
        self.restorer = ShardRestorer(
            kv, keys, node.node_id, local=self.local, client=self.client, executor=self.executor,
            rendezvous=rendezvous, settings=self.settings, lock=self._lock, stats=self.stats, expect=self._expect,
            keep=self._keep, advance_committed=self._advance_committed,
        )

    @property
    def stripe_min_bytes(self) -> int:
        """A shard at least this big is pulled striped across its holders (``ShardRestorer``'s setting)."""
        return self.restorer.stripe_min_bytes

    @stripe_min_bytes.setter
    def stripe_min_bytes(self, nbytes: int) -> None:
        self.restorer.stripe_min_bytes = nbytes

    @property
    def durable_fallback(self) -> Callable[[int, object, str], RestoreSource | None] | None:
        """``(rank, assignment, reason) -> RestoreSource | None``: restore from the durable tier (the
        ``ShardRestorer``'s; installed by the agent's durable wiring)."""
        return self.restorer.durable_fallback

    @durable_fallback.setter
    def durable_fallback(self, fallback: Callable[[int, object, str], RestoreSource | None] | None) -> None:
        self.restorer.durable_fallback = fallback

    # --- lifetime ---------------------------------------------------------------------------------------
    def start(self) -> None:
        adopted = self.local.adopt()
        if adopted:
            log.info("adopted %d snapshot segments left on this host: %s", len(adopted), adopted)
        bhost, bport = split_hostport(self.node.bulk_addr)
        self._receiver = BulkReceiver(
            bhost, bport, self.token, self._resolve, timeout=self.settings.replicate_timeout_s, on_received=self._on_received
        )
        self.bulk_address = f"{bhost}:{self._receiver.address[1]}"
        self.restorer.bulk_address = self.bulk_address  # where the holders it pulls from stream copies to
        servicer = PeerServicer(self, self.authority)
        self._server, self.peer_address = start_server(servicer, self.node.addr, self.settings.max_message_bytes, tls=self.tls)
        self.node = dataclasses.replace(self.node, addr=self.peer_address, bulk_addr=self.bulk_address)
        record, _ = read_commit(self.kv, self.keys)
        self._advance_committed(record)
        self._watch = self.kv.watch_prefix(self.keys.committed, self._on_commit_event)
        for i in range(self.settings.send_workers):
            t = threading.Thread(target=self._send_loop, name=f"replicate-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def close(self, unlink: bool = True) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(self.settings.replicate_timeout_s + 5)
        self._threads.clear()
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._server is not None:
            self._server.stop(grace=None)
            self._server = None
        if self._receiver is not None:
            self._receiver.close()
            self._receiver = None
        self.client.close()
        self.local.close(unlink)

    # --- membership -------------------------------------------------------------------------------------
    def _gen_or_zero(self) -> int:
        with self._lock:
            return self._assignment.generation if self._assignment is not None else 0

    def on_generation(self, assignment) -> None:
        """New membership: placement recomputed, queued work of older generations dropped (counted)."""
        p = placement_mod.for_assignment(assignment, self.settings.replicas)
        if p.warning:
            log.warning("%s", p.warning)
        dropped = []
        with self._cv:
            if self._assignment is not None and assignment.generation < self._assignment.generation:
                return
            self._assignment = assignment
            self._placement = p
            for rank, job in list(self._pending.items()):
                if job.generation != assignment.generation:
                    dropped.append(self._pending.pop(rank))
            self._order = [r for r in self._order if r in self._pending]
            for key in [k for k in self._expect if k[2] != assignment.generation and k not in self._restore_keys()]:
                self._expect.pop(key)
            stale = [cancel for g, cancel in self._sending.values() if g != assignment.generation]
        for cancel in stale:
            cancel()
        for job in dropped:
            self._skip(job, f"generation {assignment.generation} formed before it was replicated")

    def _restore_keys(self) -> set:
        c = self._committed
        return {k for k in self._expect if c is not None and (k[1], k[2]) == (c.step, c.generation)}

    # --- the worker side --------------------------------------------------------------------------------
    def segment_for(self, rank: int, nbytes: int) -> str:
        return self.local.ensure(rank, own=True, nbytes=nbytes, keep=self._keep()).name

    def before_overwrite(self, rank: int, segment: str) -> OverwriteAnswer:
        """A worker is about to write a snapshot into its segment ``segment``: the committed step (the write
        keeps that copy), after the copy the write will go over stopped counting (withdrawn here and from
        its manifest in etcd, so no node commits on it), or ``skip`` when that cannot be done now."""
        if not self._copies.acquire(timeout=self.settings.overwrite_wait_s):
            return OverwriteAnswer(self.committed_step(), skip=True,
                                   reason=f"a commit on this node held its copies for over {self.settings.overwrite_wait_s:g}s")
        try:
            seg = self.local.named(segment)  # by name: the rank of the worker's slot may have changed since
            if seg is None:
                log.warning("rank %d is about to write into segment %s, which this agent does not hold", rank, segment)
                return OverwriteAnswer(self.committed_step())
            try:
                c = self._withdraw_target(seg, lambda keep: seg.target_slot(None if keep is None else keep[0]))
            except (EtcdError, ReplicationError) as exc:
                return OverwriteAnswer(self.committed_step(), skip=True,
                                       reason=f"its uncommitted copy could not be withdrawn from commits ({exc})")
            return OverwriteAnswer(c.step if c is not None else None)
        finally:
            self._copies.release()

    def _withdraw_target(self, seg, target: Callable[[tuple[int, int] | None], int]) -> CommitRecord | None:
        """Under ``_copies``: withdraw the sealed copy in slot ``target(committed)`` of ``seg`` (the slot a
        write or receive goes over, keeping the committed ``(step, generation)``) from this node's commits
        and from its manifest; returns the commit that plan kept. When that step turns out committed
        meanwhile, the copy stays and the target is planned again with the newer commit. Raises
        EtcdError/ReplicationError (the copy then counts again: the caller must not overwrite it)."""
        while True:
            c = self.committed()
            slot = target((c.step, c.generation) if c is not None else None)
            if self._withdrawn.covers(seg, slot):
                return c  # withdrawn before (an offer, then its transfer): its claim went then, under this lock
            info = self._withdrawn.withdraw(seg, slot)
            if info is None or (c is not None and info.step <= c.step):
                return c  # nothing sealed there, or a step that can never be committed
            try:
                record = self.executor.withdraw(info.generation, info.step, seg.rank, self.node.node_id)
            except (EtcdError, ReplicationError):
                self._withdrawn.restore(seg, slot)
                raise
            if record is None:
                return c
            self._withdrawn.restore(seg, slot)
            self._advance_committed(record)

    def on_sealed(self, rank: int, step: int, generation: int, nbytes: int) -> None:
        job = _Job(rank, step, generation, nbytes, time.monotonic())
        with self._cv:
            current = self._assignment.generation if self._assignment is not None else None
            if current != generation:
                stale = job
            else:
                stale = self._pending.get(rank)
                self._pending[rank] = job
                if rank not in self._order:
                    self._order.append(rank)
                self._cv.notify()
        if stale is not None:
            self._skip(stale, "a newer snapshot of the rank was sealed first" if stale is not job else f"generation {generation} is not current ({current})")

    def current_assignment(self):
        """The rendezvous assignment of the newest generation this manager was told of (None before)."""
        with self._lock:
            return self._assignment

    def committed_step(self) -> int | None:
        with self._lock:
            return self._committed.step if self._committed is not None else None

    def committed(self) -> CommitRecord | None:
        with self._lock:
            return self._committed

    def _keep(self) -> tuple[int, int] | None:
        """The committed ``(step, generation)``: the copy a segment keeps when it is written or regrown."""
        c = self.committed()
        return (c.step, c.generation) if c is not None else None

    def host_memory_bytes(self) -> int:
        return self.local.memory_bytes()

    def idle(self) -> bool:
        """No replication queued or in flight (for tests and orderly shutdown)."""
        with self._lock:
            return not self._pending and not self._active

    # --- replication ------------------------------------------------------------------------------------
    def _skip(self, job: _Job, reason: str, cause: str = "replication") -> None:
        with self._lock:
            self.stats.skipped += 1
        log.warning("snapshot of rank %d step %d skipped: %s", job.rank, job.step, reason)
        events.emit("replica.skipped", rank=job.rank, step=job.step, gen=job.generation, reason=reason, cause=cause)

    def _send_loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not any(r not in self._active for r in self._order):
                    self._cv.wait()
                if self._stop:
                    return
                rank = next(r for r in self._order if r not in self._active)
                self._order.remove(rank)
                job = self._pending.pop(rank)
                self._active.add(rank)
                assignment, placement = self._assignment, self._placement
            try:
                self._replicate_once_more_on_etcd_error(job, assignment, placement)
            except (ReplicationError, TransportError, StoreError, FencedError, FailpointError) as exc:
                self._skip(job, str(exc))
            except EtcdError as exc:
                self._skip(job, f"etcd failed while replicating or committing it ({type(exc).__name__}: {exc})", cause="etcd")
            finally:
                with self._cv:
                    self._active.discard(rank)
                    self._cv.notify_all()

    def _replicate_once_more_on_etcd_error(self, job: _Job, assignment, placement) -> None:
        """``_replicate``; after an etcd error, once more while the snapshot is still the rank's newest and
        within its time budget (its manifest writes and the commit are fenced, so a repeat is safe)."""
        try:
            self._replicate(job, assignment, placement)
        except EtcdError as exc:
            why = self._superseded(job)
            if why:
                raise
            log.warning("etcd failed while replicating rank %d step %d (%s: %s); retrying it once",
                        job.rank, job.step, type(exc).__name__, exc)
            self._replicate(job, assignment, placement)

    def _sending_on(self, job: _Job, cancel: Callable[[], object]) -> None:
        """Register how to cancel ``job``'s offer or bulk send in progress (``on_generation`` cancels those of
        older generations: a peer cut off or paused would hold back every newer snapshot of the rank until
        the call's timeout); one whose generation is already over is cancelled at once."""
        with self._lock:
            current = self._assignment.generation if self._assignment is not None else None
            self._sending[job.rank] = (job.generation, cancel)
        if current != job.generation:
            cancel()

    def _sent(self, job: _Job) -> None:
        with self._lock:
            self._sending.pop(job.rank, None)

    def _superseded(self, job: _Job) -> str | None:
        with self._lock:
            if self._stop:
                return "the agent is shutting down"
            if self._assignment is None or self._assignment.generation != job.generation:
                return "the generation changed"
            if job.rank in self._pending:
                return "a newer snapshot of the rank was sealed"
        if time.monotonic() - job.queued_at > self.settings.replicate_timeout_s:
            return f"not replicated within {self.settings.replicate_timeout_s:g}s"
        return None

    def _replicate(self, job: _Job, assignment, placement: placement_mod.Placement) -> None:
        if assignment is None or placement is None or assignment.generation != job.generation:
            raise ReplicationError(f"generation {job.generation} is not current")
        found = [(s, k) for s, k in self.local.find(job.rank, job.step, job.generation) if s.name == self.local.name(job.rank, True)]
        if not found:
            raise ReplicationError(f"rank {job.rank}'s segment no longer holds step {job.step} (overwritten by a newer seal)")
        seg, slot = found[0]
        # The data is not re-read here: each receiver checks every chunk against this index as it arrives
        # (and refuses a corrupt slot), so one pass over the bytes, not two.
        digest = digest_of(seg.slot_index(slot).crcs)
        nbytes = seg.slots()[slot].nbytes
        manifest = ShardManifest(
            rank=job.rank, step=job.step, generation=job.generation, world_size=assignment.world_size,
            nbytes=nbytes, checksum=digest, owner=self.node.node_id, holders=(self.node.node_id,),
            sliced=slices_mod.marker_of(seg, slot) is not None,
        )
        with self._copies:  # a claim on the copy only while it is not being overwritten
            if not self._withdrawn.held(seg, job.step, job.generation):
                raise ReplicationError(f"rank {job.rank}'s worker is overwriting step {job.step} with a newer snapshot")
            self.executor.write_manifest(job.generation, manifest)
        failpoints.hit("repl.manifest.after_write", rank=job.rank, step=job.step)
        ref = pb.ShardRef(rank=job.rank, step=job.step, shard_generation=job.generation, nbytes=nbytes, world_size=assignment.world_size)
        for peer in placement.peers(job.rank):
            why = self._superseded(job)
            if why:
                raise ReplicationError(why)
            entry = assignment.entry(peer)
            try:
                reply = self.client.offer(entry.addr, ref, on_call=lambda call: self._sending_on(job, call.cancel))
            finally:
                self._sent(job)
            if not reply.accepted:
                raise ReplicationError(f"peer {peer} refused the offer: {reply.reason}")
            failpoints.hit("repl.send.after_offer", rank=job.rank, step=job.step, to=peer)
            remaining = self.settings.replicate_timeout_s - (time.monotonic() - job.queued_at)
            if remaining <= 0:
                raise ReplicationError(f"not replicated within {self.settings.replicate_timeout_s:g}s")
            try:
                sent = send_slot(seg, slot, split_hostport(entry.bulk_addr), self.token, timeout=remaining,
                                 pace=self._pace,
                                 on_connect=lambda sock: self._sending_on(job, functools.partial(_abort, sock)))
            finally:
                self._sent(job)
            with self._lock:
                self.stats.sent_bytes += sent
                self.stats.sent_shards += 1
            events.emit("replica.sent", rank=job.rank, step=job.step, to=peer, bytes=sent)
            failpoints.hit("repl.send.after_transfer", rank=job.rank, step=job.step, to=peer)
            manifest = manifest.with_holder(peer)
            with self._copies:
                if not self._withdrawn.held(seg, job.step, job.generation):
                    # withdrawn while it was sent: the manifest must not name this node's copy again
                    manifest = dataclasses.replace(manifest, holders=tuple(h for h in manifest.holders if h != self.node.node_id))
                self.executor.write_manifest(job.generation, manifest)
        self._try_commit(job.generation, assignment.world_size, job.step, placement)

    def _try_commit(self, generation: int, world_size: int, step: int, placement: placement_mod.Placement) -> None:
        def holds(rank: int) -> bool:
            return any(self._withdrawn.held(seg, step, generation) for seg, _ in self.local.find(rank, step, generation))

        with self._copies:  # no copy of this node is withdrawn between the check and the published commit
            decision = self.executor.try_commit(generation, world_size, step, placement.effective, placement.replicas,
                                                node_id=self.node.node_id, holds=holds)
            if decision.action != COMMIT:
                return
            record = CommitRecord(step, generation, world_size, placement.effective)
            self._advance_committed(record)
        with self._lock:
            self.stats.committed += 1
        events.emit("ckpt.committed", step=step, gen=generation)
        self.executor.prune(record)

    # --- commit tracking --------------------------------------------------------------------------------
    def _on_commit_event(self, event: WatchEvent) -> None:
        if event.type != "put" or event.key != self.keys.committed:
            return
        try:
            self._advance_committed(CommitRecord.decode(event.value))
        except ReplicationError as exc:
            log.warning("ignoring a malformed commit record: %s", exc)

    def _advance_committed(self, record: CommitRecord | None) -> None:
        if record is None:
            return
        with self._lock:
            if self._committed is not None and record.step <= self._committed.step:
                return
            self._committed = record
            placement, assignment = self._placement, self._assignment
        self._release_old(record, placement, assignment)

    def _release_old(self, record: CommitRecord, placement, assignment) -> None:
        """After a newer commit: free replica segments this node no longer needs (not a placement holder
        of that rank now, and not holding the committed step)."""
        if placement is None or assignment is None:
            return
        mine = set(placement.ranks_held_by(self.node.node_id))
        owned = set(assignment.ranks_of(self.node.node_id))
        for held in {(h.rank, h.own) for h in self.local.holdings()}:
            rank, own = held
            if (own and rank in owned) or (not own and rank in mine):
                continue
            if self.local.find(rank, record.step, record.generation):
                continue
            with self._lock:
                busy = any(k[0] == rank for k in self._expect)
            if not busy:
                self.local.drop(rank, own)

    # --- the peer side ----------------------------------------------------------------------------------
    def peer_view(self) -> tuple[int | None, frozenset[str]]:
        with self._lock:
            a = self._assignment
        if a is None:
            return None, frozenset()
        return a.generation, frozenset(a.node_ids)

    def handle_offer(self, sender: Sender, ref) -> tuple[bool, str]:
        with self._lock:
            a, p = self._assignment, self._placement
        if a is None or p is None or ref.shard_generation != a.generation:
            return False, f"shard of generation {ref.shard_generation} is not of the current generation"
        if ref.rank not in p.holders or p.owner(ref.rank) != sender.node_id:
            return False, f"{sender.node_id} does not own rank {ref.rank} in generation {a.generation}"
        if self.node.node_id not in p.peers(ref.rank):
            return False, f"{self.node.node_id} is not a holder of rank {ref.rank} in generation {a.generation}"
        try:
            seg = self.local.ensure(ref.rank, own=False, nbytes=ref.nbytes, keep=self._keep())
        except StoreSpaceError as exc:
            return False, (f"{self.node.node_id} has no shared memory left for rank {ref.rank}'s shard of "
                           f"{ref.nbytes} bytes ({exc}); give it a larger RESILIENT_SHM_DIR or lower --replicas")
        try:
            self._make_room(seg)
        except (EtcdError, ReplicationError) as exc:
            return False, f"{self.node.node_id} cannot withdraw its copy the transfer would go over now ({exc})"
        with self._lock:
            self._expect[(ref.rank, ref.step, ref.shard_generation)] = Expected(time.monotonic() + self.settings.replicate_timeout_s)
        return True, ""

    def _resolve(self, header: SlotHeader):
        if header.job != self.keys.job:
            return None
        key = (header.rank, header.step, header.generation)
        with self._lock:
            exp = self._expect.get(key)
            c = self._committed
            if exp is None or exp.deadline < time.monotonic():
                self._expect.pop(key, None)
                return None
        seg = self.local.ensure(header.rank, own=False, nbytes=header.nbytes, keep=self._keep())
        if c is None or (c.step, c.generation) != (header.step, header.generation):
            self._make_room(seg)
        else:  # the committed step itself, fetched for a restore: it goes over the slot not sealed last
            with self._copies:
                self._withdraw_target(seg, lambda keep: seg.target_slot())
        return seg

    def _make_room(self, seg) -> None:
        """Before receiving into the replica segment ``seg``: withdraw the copy the transfer will go over,
        then make room (``LocalShards.make_room``: the committed copy stays)."""
        with self._copies:
            self._withdraw_target(seg, lambda keep: receive_target(seg, keep))
            c = self.committed()
            self.local.make_room(seg, (c.step, c.generation) if c is not None else None)

    def _on_received(self, header: SlotHeader, info) -> None:
        with self._lock:
            self.stats.received_bytes += header.nbytes
            exp = self._expect.pop((header.rank, header.step, header.generation), None)
        if exp is not None:
            exp.done.set()

    def handle_pull(self, sender: Sender, ref, bulk_addr: str, byte_range: tuple[int, int] | None = None) -> pb.PullReply:
        with self._lock:
            a = self._assignment
        entry = a.entry(sender.node_id) if a is not None else None
        if entry is None or entry.bulk_addr != bulk_addr:
            raise PeerRefused("PERMISSION_DENIED", f"{sender.node_id} asked for a transfer to {bulk_addr}, not its own bulk address.")
        copies = self.local.find(ref.rank, ref.step, ref.shard_generation)
        if not copies:
            return pb.PullReply(ok=False, reason=f"{self.node.node_id} holds no copy of rank {ref.rank} step {ref.step}")
        for seg, slot in copies:
            try:
                verify(seg, slot)
            except ChecksumError as exc:
                self.restorer.report_corrupt(ref.rank, ref.step, self.node.node_id, str(exc))
                continue
            sent = send_slot(seg, slot, split_hostport(bulk_addr), self.token, timeout=self.settings.replicate_timeout_s,
                             pace=self._pace, byte_range=byte_range)
            with self._lock:
                self.stats.sent_bytes += sent
            return pb.PullReply(ok=True, nbytes=sent)
        return pb.PullReply(ok=False, corrupt=True, reason=f"{self.node.node_id}'s copy of rank {ref.rank} step {ref.step} is corrupt")

    def handle_drop(self, sender: Sender, ranks: list[int], below_step: int) -> int:
        with self._lock:
            c = self._committed
        dropped = 0
        for h in self.local.holdings():
            if h.own or h.rank not in ranks or h.step >= below_step:
                continue
            if c is not None and self.local.find(h.rank, c.step, c.generation):
                continue
            self.local.drop(h.rank, own=False)
            dropped += 1
        return dropped

    def handle_holdings(self) -> list[pb.Holding]:
        return [
            pb.Holding(shard=pb.ShardRef(rank=h.rank, step=h.step, shard_generation=h.generation, nbytes=h.nbytes),
                       segment=h.name, owner=h.own)
            for h in self.local.holdings()
        ]

    def handle_status(self) -> pb.StatusReply:
        with self._lock:
            s = self.stats
            c = self._committed
            g = self._assignment.generation if self._assignment is not None else 0
            return pb.StatusReply(
                node_id=self.node.node_id, generation=g, committed_step=c.step if c is not None else -1,
                host_memory_bytes=self.local.memory_bytes(), sent_bytes=s.sent_bytes, received_bytes=s.received_bytes,
                skipped=s.skipped,
            )

    # --- restore (``resilient.replication.restorer``) ---------------------------------------------------
    def prepare_restore(self, rank: int, assignment) -> RestoreSource | None:
        """Where ``rank`` restores from in ``assignment``: ``ShardRestorer.prepare_restore``."""
        return self.restorer.prepare_restore(rank, assignment)
