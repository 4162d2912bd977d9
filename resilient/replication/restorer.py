"""``ShardRestorer``: where a rank restores from — restore planning and fetching for one node's
``ShardManager``, which owns it (``manager.restorer``) and delegates ``prepare_restore`` to it.

Restore (``prepare_restore``): the committed step only; the local copy when present and verified, else
each holder in the restore plan in turn (``Pull``: the holder verifies its copy, reports corruption
instead of sending it, and streams it into this node's bulk receiver), every copy checked against the
manifest's digest; a corrupt copy is reported (``ckpt.verify_failed``) and skipped. ``origin`` says
where the bytes came from: ``local`` (this node's own snapshot) or ``peer:<node>`` (a replica that node
sent here before it was lost, or a copy fetched from that holder now). When the committed
step cannot be restored from memory (no commit at all, or a shard with no holder left among the members),
every rank goes to the durable tier (``durable_fallback``, installed by the agent's durable wiring) so the
ranks never mix steps; with a world-size change, any rank's verified shard serves before the disk does.
The plan itself is pure (``resilient.replication.restore``); this module carries it out.

What the restorer shares with its manager, all passed to its constructor: the manager's ``lock`` (the
restorer takes it alone, never while holding ``_copies``), the ``stats`` it counts ``verify_failed`` and
``restored_bytes`` in, the table of expected transfers (``expect``: the restorer adds an ``Expected``
entry before asking a holder for a copy; the manager's bulk receiver completes it when the copy is in),
``keep`` (the committed ``(step, generation)`` a segment keeps) and ``advance_committed``; and
``bulk_address``, which ``ShardManager.start`` sets once the receiver is bound.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from resilient import events
from resilient.errors import (
    ChecksumError,
    EtcdError,
    FencedError,
    ReplicationError,
    StoreError,
    TransportError,
)
from resilient.etcd.api import KVStore
from resilient.keys import JobKeys
from resilient.logs import get_logger
from resilient.replication import restore as restore_mod
from resilient.replication import slices as slices_mod
from resilient.replication.commit import CommitExecutor, read_commit, read_manifests
from resilient.replication.local import LocalShards, verify
from resilient.replication.manifest import CommitRecord, ShardManifest
from resilient.replication.peer_service import PeerClient, PeerRefused
from resilient.replication.settings import ReplicationSettings
from resilient.runtime.api import RestoreSource
from resilient._proto import peer_pb2 as pb

if TYPE_CHECKING:
    from resilient.replication.manager import Stats

log = get_logger(__name__)

REPLAN_WAIT_S = 30.0  # how long a restore that voided the memory step waits for the next generation
REPLAN_POLL_S = 0.05
STRIPE_MIN_BYTES = 4 << 20  # smaller shards are pulled whole from one holder (striping costs a round trip each)


@dataclass
class Expected:
    """A transfer this node's bulk receiver accepts until ``deadline``; ``done`` is set when it is in."""

    deadline: float
    done: threading.Event = field(default_factory=threading.Event)


class _SliceMissing(Exception):
    """A slice of a deduplicated step has no verified copy to restore from (internal to the restore)."""

    def __init__(self, rank: int, what: str) -> None:
        super().__init__(what)
        self.rank = rank


class ShardRestorer:
    """See the module docstring. Thread-safe: the ranks of a node plan their restores at once."""

    def __init__(
        self,
        kv: KVStore,
        keys: JobKeys,
        node_id: str,
        *,
        local: LocalShards,
        client: PeerClient,
        executor: CommitExecutor,
        rendezvous,
        settings: ReplicationSettings,
        lock: threading.RLock,
        stats: Stats,
        expect: dict[tuple[int, int, int], Expected],
        keep: Callable[[], tuple[int, int] | None],
        advance_committed: Callable[[CommitRecord | None], None],
    ) -> None:
        self.kv = kv
        self.keys = keys
        self.node_id = node_id
        self.local = local
        self.client = client
        self.executor = executor
        self.rendezvous = rendezvous
        self.settings = settings
        self.stats = stats
        self._lock = lock  # the manager's: guards ``stats``, ``_expect`` and ``_fetching``
        self._expect = expect
        self._keep = keep
        self._advance_committed = advance_committed
        self._fetching: dict[tuple[int, int, int], threading.Lock] = {}  # one restore fetch per shard at a time
        self.bulk_address: str | None = None  # this node's bulk receiver (``ShardManager.start`` sets it)
        self.stripe_min_bytes = STRIPE_MIN_BYTES  # a shard at least this big is pulled striped across its holders
        # (rank, assignment, reason) -> RestoreSource | None: restore from the durable tier
        self.durable_fallback: Callable[[int, object, str], RestoreSource | None] | None = None

    def report_corrupt(self, rank: int, step: int, holder: str, detail: str) -> None:
        """A copy of ``rank``'s shard of ``step`` on ``holder`` failed verification (one this node fetched,
        or one a peer's ``Pull`` asked of this node): counted, logged and reported (``ckpt.verify_failed``)."""
        with self._lock:
            self.stats.verify_failed += 1
        log.warning("copy of rank %d step %d on %s failed verification: %s", rank, step, holder, detail)
        events.emit("ckpt.verify_failed", rank=rank, step=step, holder=holder, detail=detail)

    def _check_copy(self, seg, slot: int, plan: restore_mod.RestorePlan, holder: str) -> bool:
        try:
            digest = verify(seg, slot)
        except ChecksumError as exc:
            self.report_corrupt(plan.source_rank, plan.step, holder, str(exc))
            return False
        if digest != plan.checksum:
            self.report_corrupt(plan.source_rank, plan.step, holder, "its digest differs from the shard manifest")
            return False
        return True

    def prepare_restore(self, rank: int, assignment) -> RestoreSource | None:
        """Where ``rank`` restores from in ``assignment``: a local segment holding the committed step
        (fetched from a peer first when needed), else the durable tier (see the module docstring). None
        when nothing was ever committed or persisted; ReplicationError when no source can supply it."""
        committed, _ = read_commit(self.kv, self.keys)
        if committed is None:
            return self._durable(rank, assignment, "no step was ever committed in memory")
        self._advance_committed(committed)
        manifests = read_manifests(self.kv, self.keys, committed.generation, committed.step)
        held = {r for r in manifests if self.local.find(r, committed.step, committed.generation)}
        members = set(assignment.node_ids)
        listed = restore_mod.listed_here(held, manifests, self.node_id)
        # whether the step is sliced comes from etcd too (not from the copies held here, which a fresh host lacks)
        sliced = any(m.sliced for m in manifests.values())
        lost = restore_mod.unrecoverable(committed, manifests, listed, members, assignment.world_size, need_all=sliced)
        if lost:
            # decided from etcd and the membership alone, so every agent decides the same: no step mix
            return self._durable(rank, assignment, f"committed step {committed.step} has no surviving copy of "
                                                   f"the shards of ranks {lost}", required=True)
        t0 = time.monotonic()
        tried: list[str] = []
        failed: list[int] = []
        for source in restore_mod.source_order(rank, assignment.world_size, committed, held, set(manifests)):
            plan = restore_mod.plan(rank, assignment.world_size, self.node_id, committed, manifests, held,
                                    members, source=source)
            if plan is None:
                continue
            src = self._restore_from(plan, assignment, t0)
            if src is not None:
                try:
                    return self._with_slices(src, rank, assignment, committed, manifests, held, members, t0)
                except _SliceMissing as exc:
                    tried.append(str(exc))
                    failed.append(exc.rank)
                break  # every rank's slice is needed: no other choice of source can do without this one
            tried.append(f"rank {source}'s shard (local: {plan.local}, holders: {list(plan.peers)})")
            failed.append(source)
        reason = f"no verified copy of committed step {committed.step} could be fetched ({'; '.join(tried) or 'no manifest'})"
        if failed and self._void_memory_step(committed, {r: manifests[r] for r in failed if r in manifests}, members,
                                             assignment.generation, reason):
            raise ReplicationError(f"Rank {rank} has no restore source in generation {assignment.generation}: {reason}; "
                                   f"that generation is over and generation {assignment.generation + 1} re-plans "
                                   "every rank's restore from the durable tier.")
        return self._durable(rank, assignment, reason, required=True)

    def _void_memory_step(self, committed: CommitRecord, failed: dict[int, ShardManifest], members: set[str],
                          generation: int, reason: str) -> bool:
        """Make one agent's fetch-time failure every agent's verdict (see ``restore``'s docstring): strike
        the members off the failed shards' manifests, publish a fault so that a rank which already planned
        the memory step re-plans, and wait for the next generation, so that this generation never trains
        (nor commits) from a mix of steps. True when the next generation formed (this one gets no source)."""
        try:
            for manifest in failed.values():
                self.executor.write_manifest(generation, restore_mod.struck_off(manifest, members))
            self.rendezvous.publish_fault(generation, "restore.unverified",
                                          {"step": committed.step, "ranks": sorted(failed), "reason": reason})
        except (FencedError, EtcdError) as exc:
            log.info("generation %d is over already; the next one re-plans its restore: %s", generation, exc)
            return True
        deadline = time.monotonic() + REPLAN_WAIT_S
        while self.kv.get(self.keys.gen(generation + 1)) is None:
            if time.monotonic() >= deadline:
                log.warning("generation %d was not replaced within %gs of its restore fault", generation, REPLAN_WAIT_S)
                return False
            time.sleep(REPLAN_POLL_S)
        return True

    def _marker(self, rank: int, step: int, generation: int, segment: str | None = None) -> slices_mod.Marker | None:
        """The slice marker of the local copy of ``rank``'s shard of (step, generation) (in ``segment`` when
        named), None when no such copy is here or it holds a whole snapshot."""
        for seg, slot in self.local.find(rank, step, generation):
            if segment is None or seg.name == segment:
                try:
                    return slices_mod.marker_of(seg, slot)
                except (StoreError, ChecksumError) as exc:
                    log.warning("cannot read the slice marker of %s: %s", seg.name, exc)
        return None

    def _with_slices(self, src: RestoreSource, rank: int, assignment, committed: CommitRecord,
                     manifests: dict[int, ShardManifest], held: set[int], members: set[str], t0: float) -> RestoreSource:
        """``src`` itself for a whole snapshot; for a sliced one (dedup), ``src`` with the local segment of
        every rank's slice of the step, each fetched like a shard (local verified copy, else a holder)."""
        marker = self._marker(src.source_rank, src.step, src.generation, src.segment)
        if marker is None:
            return src
        names = []
        for r in range(marker.world_size):
            if r == src.source_rank:
                names.append(src.segment)
                continue
            plan = restore_mod.plan(rank, assignment.world_size, self.node_id, committed, manifests, held,
                                    members, source=r)
            got = self._restore_from(plan, assignment, t0, announce=False) if plan is not None else None
            if got is None:
                raise _SliceMissing(r, f"rank {r}'s slice of the deduplicated step {src.step} (holders: "
                                       f"{list(plan.peers) if plan is not None else 'no manifest'})")
            names.append(got.segment)
        log.info("rank %d restores step %d from %d slices (dedup)", rank, src.step, len(names))
        return dataclasses.replace(src, slices=tuple(names))

    def _restore_from(self, plan: restore_mod.RestorePlan, assignment, t0: float,
                      announce: bool = True) -> RestoreSource | None:
        if plan.local:
            for seg, slot in self.local.find(plan.source_rank, plan.step, plan.generation):
                if self._check_copy(seg, slot, plan, self.node_id):
                    return self._source(plan, seg.name, self._origin_of(seg, plan), t0, announce)
        if len(plan.peers) > 1 and plan.nbytes >= self.stripe_min_bytes:
            try:
                name, used = self._pull_striped(plan, assignment)
            except (PeerRefused, ReplicationError, TransportError, StoreError) as exc:
                log.warning("striped restore of rank %d's shard from %s failed (%s); pulling it whole from one holder",
                            plan.source_rank, list(plan.peers), exc)
                name, used = None, []
            if name is not None:
                return self._source(plan, name, "peer:" + "+".join(used), t0, announce)
        for peer in plan.peers:
            entry = assignment.entry(peer)
            try:
                name = self._pull(plan, peer, entry)
            except (PeerRefused, ReplicationError, TransportError, StoreError) as exc:
                log.warning("restore of rank %d from %s failed: %s", plan.rank, peer, exc)
                continue
            if name is not None:
                return self._source(plan, name, f"peer:{peer}", t0, announce)
        return None

    def _origin_of(self, seg, plan: restore_mod.RestorePlan) -> str:
        """``local`` for this node's own snapshot; ``peer:<node>`` for a replica that node sent here."""
        if seg.name == self.local.name(plan.source_rank, True) or not plan.owner or plan.owner == self.node_id:
            return "local"
        return f"peer:{plan.owner}"

    def _durable(self, rank: int, assignment, reason: str, required: bool = False) -> RestoreSource | None:
        fallback = self.durable_fallback
        src = fallback(rank, assignment, reason) if fallback is not None else None
        marker = self._marker(src.source_rank, src.step, src.generation, src.segment) if src is not None else None
        if marker is not None:  # a deduplicated checkpoint: every rank's slice from the durable tier too
            names = []
            for r in range(marker.world_size):
                part = src if r == src.source_rank else fallback(r, assignment, reason)
                if part is None or (part.step, part.generation) != (src.step, src.generation):
                    raise ReplicationError(f"Rank {rank} cannot be restored: rank {r}'s slice of the deduplicated "
                                           f"durable checkpoint of step {src.step} could not be loaded ({reason}).")
                names.append(part.segment)
            src = dataclasses.replace(src, slices=tuple(names))
        if src is not None or not required:
            if src is None:
                log.info("rank %d: no restore source (%s; no durable checkpoint either)", rank, reason)
            return src
        raise ReplicationError(f"Rank {rank} cannot be restored: {reason}, and no durable checkpoint could be "
                               "loaded (run with --persist-dir to have one).")

    def _pull(self, plan: restore_mod.RestorePlan, peer: str, entry) -> str | None:
        key = (plan.source_rank, plan.step, plan.generation)
        with self._lock:
            fetch = self._fetching.setdefault(key, threading.Lock())
        with fetch:  # one fetch per shard: the local ranks of a deduplicated step all need the same slices
            for s, slot in self.local.find(*key):  # fetched meanwhile for another rank of this node
                if self._check_copy(s, slot, plan, self.node_id):
                    return s.name
            return self._pull_once(plan, peer, entry)

    def _pull_striped(self, plan: restore_mod.RestorePlan, assignment) -> tuple[str | None, list[str]]:
        """Pull one shard from all its holders at once: disjoint byte ranges (one per holder, in the plan's
        order), each streamed by its holder into this node's receiver, which verifies every chunk and seals
        the slot when the last stripe is in. A stripe whose holder fails is asked of the next holder.
        Returns the segment name (None: not verified) and the holders that served stripes."""
        key = (plan.source_rank, plan.step, plan.generation)
        with self._lock:
            fetch = self._fetching.setdefault(key, threading.Lock())
        with fetch:
            for s, slot in self.local.find(*key):  # fetched meanwhile for another rank of this node
                if self._check_copy(s, slot, plan, self.node_id):
                    return s.name, [self.node_id]
            peers = list(plan.peers)
            ranges = restore_mod.stripes(plan.nbytes, len(peers))
            exp = Expected(time.monotonic() + self.settings.replicate_timeout_s)
            seg = self.local.ensure(plan.source_rank, own=False, nbytes=plan.nbytes, keep=self._keep())
            with self._lock:
                self._expect[key] = exp
            ref = pb.ShardRef(rank=plan.source_rank, step=plan.step, shard_generation=plan.generation, nbytes=plan.nbytes,
                              world_size=plan.world_size)
            used: list[str] = []
            errors: list[str] = []

            def fetch_stripe(i: int) -> None:
                for k in range(len(peers)):
                    peer = peers[(i + k) % len(peers)]
                    try:
                        reply = self.client.pull(assignment.entry(peer).addr, ref, self.bulk_address,
                                                 timeout=self.settings.replicate_timeout_s, byte_range=ranges[i])
                    except (PeerRefused, ReplicationError, TransportError, StoreError) as exc:
                        errors.append(f"{peer}: {exc}")
                        continue
                    if reply.ok:
                        used.append(peer)
                        return
                    if reply.corrupt:
                        self.report_corrupt(plan.source_rank, plan.step, peer, reply.reason)
                    errors.append(f"{peer}: {reply.reason}")

            threads = [threading.Thread(target=fetch_stripe, args=(i,), name=f"stripe-{i}", daemon=True)
                       for i in range(len(ranges))]
            try:
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(self.settings.replicate_timeout_s + self.settings.rpc_timeout_s)
                if not exp.done.wait(self.settings.rpc_timeout_s if not errors else 0.0):
                    raise ReplicationError(f"the stripes of rank {plan.source_rank}'s shard did not all arrive "
                                           f"({'; '.join(errors) or 'no holder reported a failure'})")
            finally:
                with self._lock:
                    self._expect.pop(key, None)
            with self._lock:
                self.stats.restored_bytes += plan.nbytes
            for s, slot in self.local.find(*key):
                if s.name == seg.name and self._check_copy(s, slot, plan, "+".join(sorted(set(used)))):
                    log.info("rank %d's shard of step %d pulled in %d stripes from %s", plan.source_rank, plan.step,
                             len(ranges), sorted(set(used)))
                    return s.name, sorted(set(used))
            return None, sorted(set(used))

    def _pull_once(self, plan: restore_mod.RestorePlan, peer: str, entry) -> str | None:
        key = (plan.source_rank, plan.step, plan.generation)
        exp = Expected(time.monotonic() + self.settings.replicate_timeout_s)
        seg = self.local.ensure(plan.source_rank, own=False, nbytes=plan.nbytes, keep=self._keep())
        with self._lock:
            self._expect[key] = exp
        try:
            ref = pb.ShardRef(rank=plan.source_rank, step=plan.step, shard_generation=plan.generation, nbytes=plan.nbytes,
                              world_size=plan.world_size)
            reply = self.client.pull(entry.addr, ref, self.bulk_address, timeout=self.settings.replicate_timeout_s)
            if not reply.ok:
                if reply.corrupt:
                    self.report_corrupt(plan.source_rank, plan.step, peer, reply.reason)
                raise ReplicationError(reply.reason)
            if not exp.done.wait(self.settings.rpc_timeout_s):
                raise ReplicationError(f"{peer} reported the transfer sent but it never arrived")
        finally:
            with self._lock:
                self._expect.pop(key, None)
        with self._lock:
            self.stats.restored_bytes += plan.nbytes
        for s, slot in self.local.find(plan.source_rank, plan.step, plan.generation):
            if s.name == seg.name and self._check_copy(s, slot, plan, peer):
                return s.name
        return None

    def _source(self, plan: restore_mod.RestorePlan, segment: str, origin: str, t0: float,
                announce: bool = True) -> RestoreSource:
        if announce:
            events.emit("restore.plan", rank=plan.rank, step=plan.step, origin=origin, source_rank=plan.source_rank,
                        seconds=round(time.monotonic() - t0, 6))
        return RestoreSource(step=plan.step, generation=plan.generation, segment=segment, source_rank=plan.source_rank,
                             origin=origin, world_size=plan.world_size)
