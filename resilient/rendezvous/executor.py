"""The etcd side of the rendezvous: carries out what ``state.py`` decides.

``JoinAttempt`` is one node's way into the next generation, written as a step machine (``step(now)``
does a few etcd operations and says when it next needs to run) so the blocking ``Rendezvous.join`` and
the property-based tests drive the same code. The protocol keeps every round O(n):

1. announce -- one transaction: put ``waiting/<me>`` (and ``nodes/<me>`` for a fresh lease), bound to the
   node's lease, and read ``rdzv``, ``closed`` and ``closer``; the put applies only while the newest
   generation is the one the node knows (its last, or what it read before) -- a newer one is read instead,
   and joined if it holds the node; whoever finds nobody closing rounds claims ``closer`` in a second
   transaction;
2. a follower then only watches ``gen/`` (its assignment arrives in the event), ``closer`` (to take over
   if the closer vanishes) and ``closed``;
3. the closer reads the round once (nodes, waiting, last assignment), follows ``waiting/`` and ``nodes/``
   by watch, asks ``ClosingRound`` what to do, and writes ``gen/<g+1>`` together with ``rdzv`` in one
   transaction guarded by ``rdzv``'s mod revision and its own hold on ``closer`` (plus, for rounds of up
   to ``GUARD_LIMIT`` nodes, the waiting key of every node it includes, so a node that died in between is
   never placed). After the write it lists ``nodes/`` once; a member that vanished in between gets a
   ``node-lost`` fault for the new generation, so everyone moves on at once.

``GenerationWatch`` is a member watching its generation; ``fenced_txn`` guards every write made on behalf
of a generation; ``consume_restart`` charges the job-wide restart budget.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

from resilient import events
from resilient.errors import (
    EtcdIndeterminateError,
    FencedError,
    LeaseExpiredError,
    RendezvousClosedError,
    RendezvousError,
)
from resilient.etcd.api import Compare, Delete, Get, KeyValue, KVStore, Op, Put, TxnResult, WatchEvent, WatchHandle
from resilient.keys import JobKeys
from resilient.logs import get_logger
from resilient.rendezvous import budget
from resilient.rendezvous.membership import Membership
from resilient.rendezvous.model import Assignment, NodeInfo
from resilient.rendezvous.settings import RendezvousSettings
from resilient.rendezvous.state import (
    Close,
    ClosingRound,
    NodeDown,
    NodeUp,
    Waiting,
    WaitingGone,
    member_trigger,
    plan_assignment,
)

log = get_logger(__name__)

GUARD_LIMIT = 60  # etcd allows 128 operations per transaction by default (--max-txn-ops)


@dataclass(frozen=True)
class Joined:
    assignment: Assignment
    formed_rev: int  # etcd revision at which the generation formed (watch from here)


@dataclass(frozen=True)
class Pending:
    wake_at: float | None  # run step() again at this time, or on the next watch event (None)


def closed_error(keys: JobKeys, raw: bytes) -> RendezvousClosedError:
    try:
        d = json.loads(raw)
        what = f"{d.get('status')} ({d.get('reason')}) by node {d.get('by')}"
    except ValueError:
        what = repr(raw[:200])
    return RendezvousClosedError(
        f"Job {keys.job!r} is closed: {what}; no new generation will form. Start the job under a new id to run again."
    )


def _rdzv_state(kvs: list[KeyValue]) -> tuple[int, int]:
    """(last formed generation, the revision it formed at) from a read of the ``rdzv`` key."""
    if not kvs:
        return 0, 0
    try:
        return int(json.loads(kvs[0].value)["g"]), kvs[0].mod_revision
    except (ValueError, KeyError, TypeError) as exc:
        raise RendezvousError(f"Malformed rendezvous record {kvs[0].value[:200]!r} in etcd: {exc}.") from exc


class JoinAttempt:
    """One node's way into the next generation (see the module docstring for the protocol)."""

    def __init__(
        self,
        kv: KVStore,
        keys: JobKeys,
        node: NodeInfo,
        settings: RendezvousSettings,
        membership: Membership,
        *,
        wall: Callable[[], float] = time.time,
        notify: Callable[[], None] = lambda: None,
        guard_limit: int = GUARD_LIMIT,
        last: Joined | None = None,
    ) -> None:
        self.kv = kv
        self.keys = keys
        self.node = node
        self.settings = settings
        self.membership = membership
        self.wall = wall
        self.notify = notify
        self.guard_limit = guard_limit
        self._lock = threading.Lock()
        self._events: deque[WatchEvent] = deque()
        self._watches: list[WatchHandle] = []
        self._phase = "announce"
        # the newest generation this attempt knows of (and the revision it formed at); ``_known`` is False
        # until the job's state was read or handed in (``last``: the generation this node joined last)
        self._known = last is not None
        self._known_gen = last.assignment.generation if last is not None else 0
        self._formed_rev = last.formed_rev if last is not None else 0
        self._previous: Assignment | None = None
        self._round: ClosingRound | None = None
        self._lease = 0
        self.requests = 0  # etcd requests made (for the scale benchmark)

    # -- plumbing -----------------------------------------------------------------------------------------
    @property
    def phase(self) -> str:
        return self._phase

    @property
    def is_closer(self) -> bool:
        return self._phase in ("closer_init", "closing")

    def _feed(self, event: WatchEvent) -> None:
        with self._lock:
            self._events.append(event)
        self.notify()

    def _drain(self) -> list[WatchEvent]:
        with self._lock:
            out = list(self._events)
            self._events.clear()
        return out

    def _watch(self, prefix: str, after: int) -> None:
        self.requests += 1
        self._watches.append(self.kv.watch_prefix(prefix, self._feed, start_revision=after))

    def _unwatch(self) -> None:
        watches, self._watches = self._watches, []
        for w in watches:
            w.cancel()
        self._drain()

    def cancel(self) -> None:
        """Give up: stop watching, withdraw from the round and hand the closer role back."""
        self._unwatch()
        lease = self.membership.lease
        if lease is None:
            return
        self.kv.txn(
            [Compare(self.keys.closer, "lease", "==", lease)], [Delete(self.keys.closer), Delete(self.keys.waiting(self.node.node_id))],
            [Delete(self.keys.waiting(self.node.node_id))],
        )

    # -- the step machine ---------------------------------------------------------------------------------
    def step(self, now: float) -> Joined | Pending:
        """Advance as far as possible without waiting. Raises RendezvousClosedError when the job is closed;
        etcd errors propagate (the caller retries; every step is safe to repeat)."""
        for _ in range(16):
            try:
                outcome = getattr(self, "_" + self._phase)(now)
            except LeaseExpiredError:
                self.membership.mark_lost()
                self._unwatch()
                self._phase = "announce"
                continue
            if outcome is not None:
                return outcome
        return Pending(now)

    def _announce(self, now: float) -> Joined | None:
        """Ask into the generation after the newest one known. The waiting record is written only while no
        newer generation formed (guarded by ``rdzv``): a record written after a generation that already holds
        this node would read, to its members, as this node asking in again, and end that generation (and a
        later one could form on the stale record before the node looks). Instead a newer generation is read:
        joined if it holds this node, else the node asks into the one after it."""
        self._unwatch()
        lease = self.membership.ensure()
        self._lease = lease
        k = self.keys
        me = self.node.node_id
        value = self.node.to_json()
        puts: list[Op] = [Put(k.waiting(me), value, lease)]
        if not self.membership.announced:
            puts.append(Put(k.node(me), value, lease))
        reads: list[Op] = [Get(k.rdzv), Get(k.closed), Get(k.closer)]
        unchanged: list[Compare] = []
        if self._known:
            unchanged = [Compare(k.rdzv, "mod", "==", self._formed_rev) if self._formed_rev
                         else Compare(k.rdzv, "version", "==", 0)]
        claimed = False
        try:
            self.requests += 1  # the usual case: somebody closes rounds already
            r = self.kv.txn(unchanged + [Compare(k.closer, "version", ">", 0)], puts + reads, reads)
            if not r.succeeded and not r.responses[-1] and not self._moved(_rdzv_state(r.responses[-3])[1]):
                self.requests += 1  # nobody closes rounds: claim the role with the announcement
                r = self.kv.txn(unchanged + [Compare(k.closer, "version", "==", 0)],
                                puts + [Put(k.closer, me.encode(), lease)] + reads, reads)
                claimed = r.succeeded
        except EtcdIndeterminateError as exc:
            log.info("announce may not have been applied (%s); announcing again", exc)
            return None
        rdzv, closed, closer = r.responses[-3:]
        if closed:
            raise closed_error(k, closed[0].value)
        gen, formed_rev = _rdzv_state(rdzv)
        if not r.succeeded:
            # a newer generation formed, or the closer came or went between the two transactions
            return self._newer(gen, formed_rev) if self._moved(formed_rev) else None
        self.membership.mark_announced(lease)
        self._known = True
        self._known_gen, self._formed_rev = gen, formed_rev
        if claimed or (closer and closer[0].value == me.encode() and closer[0].lease == lease):
            if claimed:
                log.info("closing rendezvous rounds for job %s", k.job)
            self._phase = "closer_init"
            return None
        self._watch(k.gen_prefix, r.revision)
        self._watch(k.closer, r.revision)
        self._watch(k.closed, r.revision)
        self._phase = "follow"
        return None

    def _moved(self, formed_rev: int) -> bool:
        """Whether ``rdzv``, read at the end of an announce as formed at ``formed_rev``, shows a generation
        newer than the known one."""
        return self._known and formed_rev != self._formed_rev

    def _newer(self, gen: int, formed_rev: int) -> Joined | None:
        """Generation ``gen`` (formed at ``formed_rev``) is newer than the known one: join it if it holds this
        node, else take it as known (the node then asks into the next)."""
        self.requests += 1
        got = self.kv.get(self.keys.gen(gen))
        if got is None:
            raise RendezvousError(
                f"Job {self.keys.job!r}: rdzv names generation {gen} but {self.keys.gen(gen)} is missing.")
        a = Assignment.from_json(got.value)
        self._known_gen, self._formed_rev = gen, formed_rev
        if a.entry(self.node.node_id) is not None:
            return Joined(a, formed_rev)
        log.info("generation %d formed without this node (%d nodes); asking into the next", gen, len(a.nodes))
        return None

    def _follow(self, now: float) -> Joined | Pending | None:
        for ev in self._drain():
            if ev.key == self.keys.closed and ev.type == "put":
                raise closed_error(self.keys, ev.value)
            if ev.key == self.keys.closer:
                if ev.type == "delete":
                    log.info("the closing node left; announcing again to take over if needed")
                    self._phase = "announce"
                    return None
                continue
            if ev.type != "put" or not ev.key.startswith(self.keys.gen_prefix):
                continue
            a = Assignment.from_json(ev.value)
            if a.generation <= self._known_gen:
                continue
            self._known_gen, self._formed_rev = a.generation, ev.mod_revision
            if a.entry(self.node.node_id) is not None:
                self._unwatch()
                return Joined(a, ev.mod_revision)
            log.info("generation %d formed without this node (%d nodes); waiting for the next", a.generation, len(a.nodes))
            self._phase = "announce"
            return None
        return Pending(None)

    def _closer_init(self, now: float) -> None:
        self._unwatch()
        k = self.keys
        self.requests += 1
        r = self.kv.txn(
            [],
            [Get(k.rdzv), Get(k.closed), Get(k.closer), Get(k.nodes_prefix, prefix=True), Get(k.waiting_prefix, prefix=True)],
        )
        rdzv, closed, closer, nodes, waiting = r.responses
        if closed:
            raise closed_error(k, closed[0].value)
        if not closer or closer[0].value != self.node.node_id.encode() or closer[0].lease != self._lease:
            self._phase = "announce"
            return None
        gen, formed_rev = _rdzv_state(rdzv)
        self._known_gen, self._formed_rev = gen, formed_rev
        if gen and (self._previous is None or self._previous.generation != gen):
            self.requests += 1
            prev = self.kv.get(k.gen(gen))
            if prev is None:
                raise RendezvousError(f"Job {k.job!r}: rdzv names generation {gen} but {k.gen(gen)} is missing.")
            self._previous = Assignment.from_json(prev.value)
        elif not gen:
            self._previous = None
        entries = []
        for item in waiting:
            w = self._waiting_of(item)
            if w is not None:
                entries.append(w)
        if not any(w.info.node_id == self.node.node_id and w.mod_revision > formed_rev for w in entries):
            self._phase = "announce"  # my own waiting key predates the last generation: ask in again
            return None
        self._round = ClosingRound.start(
            now,
            min_nodes=self.settings.min_nodes,
            max_nodes=self.settings.max_nodes,
            last_call=self.settings.last_call,
            rejoin_grace=max(self.settings.last_call, float(self.settings.timeouts.lease_ttl)),
            previous=self._previous,
            formed_rev=formed_rev,
            alive=[item.key[len(k.nodes_prefix):] for item in nodes],
            waiting=entries,
        )
        for prefix in (k.waiting_prefix, k.nodes_prefix, k.closer, k.closed):
            self._watch(prefix, r.revision)
        self._phase = "closing"
        return None

    def _waiting_of(self, item: KeyValue | WatchEvent) -> Waiting | None:
        try:
            info = NodeInfo.from_json(item.value)
        except RendezvousError as exc:
            log.warning("ignoring a malformed waiting record at %s: %s", item.key, exc)
            return None
        return Waiting(info, item.mod_revision)

    def _closing(self, now: float) -> Joined | Pending | None:
        k = self.keys
        rnd = self._round
        assert rnd is not None
        for ev in self._drain():
            if ev.key == k.closed and ev.type == "put":
                raise closed_error(k, ev.value)
            if ev.key == k.closer:
                if ev.type == "delete" or ev.value != self.node.node_id.encode():
                    log.warning("lost the closer role (lease gone?); announcing again")
                    self._phase = "announce"
                    return None
                continue
            if ev.key.startswith(k.waiting_prefix):
                if ev.type == "put":
                    w = self._waiting_of(ev)
                    if w is not None:
                        rnd.apply(now, w)
                else:
                    rnd.apply(now, WaitingGone(ev.key[len(k.waiting_prefix):]))
            elif ev.key.startswith(k.nodes_prefix):
                node = ev.key[len(k.nodes_prefix):]
                rnd.apply(now, NodeUp(node) if ev.type == "put" else NodeDown(node))
        rnd.apply(now, None)
        decision = rnd.decide(now)
        if not isinstance(decision, Close):
            return Pending(decision.until)
        return self._close(decision)

    def _close(self, decision: Close) -> Joined | None:
        k = self.keys
        g = self._known_gen + 1
        a = plan_assignment(g, decision.candidates, self._previous, self.settings.max_nodes, self.wall())
        guard = [
            Compare(k.rdzv, "mod", "==", self._formed_rev) if self._formed_rev else Compare(k.rdzv, "version", "==", 0),
            Compare(k.closer, "lease", "==", self._lease),
            Compare(k.closed, "version", "==", 0),
        ]
        if len(a.nodes) <= self.guard_limit:
            guard += [Compare(k.waiting(n), "mod", "==", decision.revisions[n]) for n in a.node_ids]
        raw = a.to_json()
        rdzv = json.dumps({"g": g, "w": a.world_size, "n": len(a.nodes), "t": a.created_at}, separators=(",", ":"))
        try:
            self.requests += 1
            r = self.kv.txn(guard, [Put(k.gen(g), raw), Put(k.rdzv, rdzv.encode())])
            ok, formed_rev = r.succeeded, r.revision
        except EtcdIndeterminateError as exc:
            self.requests += 1
            got = self.kv.get(k.gen(g))
            ok = got is not None and got.value == raw
            formed_rev = got.mod_revision if got is not None else 0
            log.info("closing generation %d had an unknown outcome (%s); it %s", g, exc, "applied" if ok else "did not apply")
        if not ok:
            self._phase = "closer_init"  # something moved: read the round again
            return None
        log.info("formed generation %d: %d nodes, world size %d (%s)", g, len(a.nodes), a.world_size, decision.reason)
        events.emit("gen.formed", gen=g, world_size=a.world_size, nodes=len(a.nodes), reason=decision.reason)
        self._known_gen, self._formed_rev, self._previous = g, formed_rev, a
        self._post_check(a, formed_rev)
        if a.entry(self.node.node_id) is not None:
            self._unwatch()
            return Joined(a, formed_rev)
        self._phase = "announce"  # passed over (the job is at MAX): keep closing rounds as a spare
        return None

    def _post_check(self, a: Assignment, formed_rev: int) -> None:
        """A member that vanished between our read and our write gets a node-lost fault at once."""
        if len(a.nodes) <= self.guard_limit:
            return  # the close guard already proved every member's key was there
        self.requests += 1
        nodes, _ = self.kv.get_prefix(self.keys.nodes_prefix)
        alive = {kv.key[len(self.keys.nodes_prefix):] for kv in nodes}
        for n in a.node_ids:
            if n not in alive:
                log.warning("node %s vanished while generation %d formed; publishing its loss", n, a.generation)
                try:
                    fenced_txn(
                        self.kv, self.keys, a.generation, self.node.node_id, self._lease, [],
                        [Put(self.keys.fault(a.generation, n), _fault_value("node-lost", {}, self.node.node_id, self.wall()))],
                    )
                except FencedError:
                    return


def _fault_value(what: str, detail: dict, by: str, at: float) -> bytes:
    return json.dumps({"what": what, "detail": detail, "by": by, "t": at}, separators=(",", ":"), default=str).encode()


# --- fencing ---------------------------------------------------------------------------------------------
def fenced_txn(
    kv: KVStore,
    keys: JobKeys,
    generation: int,
    node_id: str,
    lease: int | None,
    compares: Sequence[Compare],
    success: Sequence[Op],
    failure: Sequence[Op] = (),
) -> TxnResult:
    """``kv.txn`` that applies only while ``generation`` is the job's newest and this node still holds its
    lease; raises FencedError otherwise. A failure of the caller's own compares returns the result (with
    only the caller's failure responses)."""
    if lease is None:
        raise FencedError(
            f"Node {node_id} has no etcd lease (it expired or was revoked): it may not write on behalf of "
            f"generation {generation}; rejoin first."
        )
    guard = [
        Compare(keys.gen(generation), "version", ">", 0),
        Compare(keys.gen(generation + 1), "version", "==", 0),
        Compare(keys.node(node_id), "lease", "==", lease),
    ]
    probe: list[Op] = [Get(keys.gen(generation + 1)), Get(keys.node(node_id)), Get(keys.gen(generation))]
    r = kv.txn(guard + list(compares), list(success), list(failure) + probe)
    if r.succeeded:
        return r
    newer, mine, this = r.responses[-3:]
    if newer or not this:
        raise FencedError(
            f"Write on behalf of generation {generation} refused: "
            + ("the job has moved on to a newer generation" if newer else "that generation never formed")
            + f"; node {node_id} must rejoin."
        )
    if not mine or mine[0].lease != lease:
        raise FencedError(
            f"Write on behalf of generation {generation} refused: node {node_id}'s lease {lease:x} is gone "
            "(paused or cut off past its TTL); it must rejoin."
        )
    return TxnResult(False, r.revision, r.responses[:-3])


# --- a member watching its generation --------------------------------------------------------------------
class GenerationWatch:
    """Calls ``on_new_round(reason)`` once, from its own thread, when the generation stops being valid."""

    def __init__(
        self,
        kv: KVStore,
        keys: JobKeys,
        assignment: Assignment,
        formed_rev: int,
        max_nodes: int,
        on_new_round: Callable[[str], None],
    ) -> None:
        self.kv = kv
        self.keys = keys
        self.assignment = assignment
        self.formed_rev = formed_rev
        self.max_nodes = max_nodes
        self.on_new_round = on_new_round
        self._lock = threading.Lock()
        self._fired: str | None = None
        self._watches: list[WatchHandle] = []
        self._cancelled = False

    @property
    def fired(self) -> str | None:
        return self._fired

    def start(self) -> None:
        k = self.keys
        for prefix in (k.nodes_prefix, k.waiting_prefix, k.fault_prefix, k.gen_prefix, k.closed):
            handle = self.kv.watch_prefix(prefix, self._on_event, start_revision=self.formed_rev)
            with self._lock:
                cancelled = self._cancelled or self._fired is not None
                if not cancelled:
                    self._watches.append(handle)
            if cancelled:
                handle.cancel()

    def _on_event(self, event: WatchEvent) -> None:
        if self._fired is not None or self._cancelled:
            return
        reason = member_trigger(self.keys, self.assignment, self.max_nodes, event)
        if reason is not None:
            self.fire(reason)

    def fire(self, reason: str) -> None:
        with self._lock:
            if self._fired is not None or self._cancelled:
                return
            self._fired = reason
        log.info("generation %d is over: %s", self.assignment.generation, reason)
        events.emit("rdzv.round", reason=reason, gen=self.assignment.generation)
        # stop receiving events at once (the next round's writes would otherwise reach every member still
        # watching), and call back without waiting for that: two threads, never the watch's own
        threading.Thread(target=self.cancel, name="rdzv-unwatch", daemon=True).start()
        threading.Thread(target=self.on_new_round, args=(reason,), name="rdzv-new-round", daemon=True).start()

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            watches, self._watches = self._watches, []
        for w in watches:
            w.cancel()


# --- the restart budget ----------------------------------------------------------------------------------
def consume_restart(
    kv: KVStore,
    keys: JobKeys,
    generation: int,
    reason: str,
    max_restarts: int,
    window: float | None,
    wall: Callable[[], float] = time.time,
) -> int:
    """Charge one restart for leaving ``generation`` (idempotent per generation); returns the job's total
    restart count. Raises RestartBudgetExceededError when the budget is spent."""
    for _ in range(64):
        cur = kv.get(keys.restarts)
        record = budget.BudgetRecord.from_json(cur.value) if cur is not None else budget.BudgetRecord()
        new, changed = budget.charge(record, generation, reason, wall(), max_restarts, window)
        if not changed:
            return new.total
        guard = Compare(keys.restarts, "mod", "==", cur.mod_revision) if cur else Compare(keys.restarts, "version", "==", 0)
        try:
            r = kv.txn([guard], [Put(keys.restarts, new.to_json())])
        except EtcdIndeterminateError:
            continue  # re-read: a charge already applied for this generation is not repeated
        if r.succeeded:
            log.info("restart %d of at most %d charged (%s)", new.total, max_restarts, reason)
            return new.total
    raise RendezvousError(
        f"Could not update the restart budget of job {keys.job!r} after 64 tries (too much contention on "
        f"{keys.restarts}); retry."
    )
