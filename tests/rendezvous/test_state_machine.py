"""Property-based test of the rendezvous protocol over FakeKV (synchronous watches, injected clock).

Hypothesis drives joins, steps, keep-alives, time passing (lease expiry), pauses (a node that stops keeping
alive, then resumes and tries to write on behalf of its old generation), faults, graceful leaves and etcd
leader changes (``FakeKV.leader_change`` + ``fail_next``, also indeterminate failures). Invariants: one
assignment per generation (gen/<g> never rewritten, every node that joined g holds that assignment),
generations strictly increasing (1..G, rdzv at G, each node's joins increasing), no stale write accepted,
and every node placed in a generation was alive (its node key present) when the generation closed.
Liveness (the ``settle`` rule): once every node runs steadily, the job converges to one generation of
min(nodes, MAX) members that nothing ends, within a few lease TTLs.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from resilient.config import Timeouts
from resilient.errors import EtcdIndeterminateError, EtcdUnavailableError, FencedError
from resilient.etcd.api import Put
from resilient.etcd.fake import FakeKV, ManualClock
from resilient.keys import JobKeys
from resilient.rendezvous.executor import GenerationWatch, JoinAttempt, Joined, fenced_txn
from resilient.rendezvous.membership import Membership
from resilient.rendezvous.model import Assignment, NodeInfo
from resilient.rendezvous.settings import RendezvousSettings

KEYS = JobKeys("prop")
NODES = ["n0", "n1", "n2", "n3"]
TIMEOUTS = Timeouts.from_lease_ttl(2, last_call=1.0, join_timeout=60.0)
SETTINGS = RendezvousSettings(2, 3, last_call=1.0, join_timeout=60.0, timeouts=TIMEOUTS)


class CheckedKV(FakeKV):
    """Records every generation as it is written and checks its members were alive at that moment."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__(clock)
        self.gens: dict[int, bytes] = {}
        self.violations: list[str] = []

    def txn(self, compares, success, failure=()):
        try:
            return super().txn(compares, success, failure)
        finally:
            self._check_new_generations()

    def _check_new_generations(self) -> None:
        snap = self.snapshot()
        for key, kv in snap.items():
            if not key.startswith(KEYS.gen_prefix):
                continue
            g = int(key[len(KEYS.gen_prefix):])
            if g in self.gens:
                if self.gens[g] != kv.value:
                    self.violations.append(f"generation {g} was rewritten")
                continue
            self.gens[g] = kv.value
            for n in Assignment.from_json(kv.value).node_ids:
                if KEYS.node(n) not in snap:
                    self.violations.append(f"generation {g} placed {n}, whose node key was gone at close")


class InlineWatch(GenerationWatch):
    """Records the reason instead of calling back from a thread (the test runs single-threaded)."""

    def fire(self, reason: str) -> None:
        if self._fired is None and not self._cancelled:
            self._fired = reason


class Node:
    def __init__(self, name: str, kv: CheckedKV, clock: ManualClock) -> None:
        i = int(name[1:])
        self.info = NodeInfo(name, f"h{i}", f"127.0.0.1:{4000 + i}", f"127.0.0.1:{5000 + i}", 1 + i % 2, 6000 + i)
        self.membership = Membership(kv, KEYS, self.info, TIMEOUTS, clock=clock, on_lease_lost=self._lost)
        self.kv = kv
        self.attempt: JoinAttempt | None = None
        self.joined: Joined | None = None
        self.watch: InlineWatch | None = None
        self.paused = False
        self.active = True
        self.history: list[int] = []

    def _lost(self, lease: int) -> None:
        if self.watch is not None:
            self.watch.fire(f"lease-lost:{self.info.node_id}")


def _transient(fn):
    try:
        fn()
    except (EtcdUnavailableError, EtcdIndeterminateError):
        pass


class RendezvousMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock(1000.0)
        self.kv = CheckedKV(self.clock)
        self.nodes = {n: Node(n, self.kv, self.clock) for n in NODES}
        self.outcomes: list[tuple[bool, bool]] = []  # (stale, accepted) of every fenced write tried

    node = st.sampled_from(NODES)

    @initialize(active=st.lists(st.sampled_from(NODES), min_size=2, max_size=4, unique=True))
    def form_first_generation(self, active: list[str]) -> None:
        """Most examples start from a formed generation, so the rules below exercise re-forming."""
        for n in NODES:
            self.nodes[n].active = n in active
        for _ in range(6):
            self.tick(0.4, NODES)
        assert self.kv.gens, "the first generation did not form"

    def _agent(self, nd: Node) -> None:
        """What a node agent does when it runs: keep its lease alive, (re)join when it has no valid
        generation, and advance its join."""
        nd.membership.keepalive_once()
        if nd.attempt is None and (nd.joined is None or (nd.watch is not None and nd.watch.fired)):
            self.begin_join(nd.info.node_id)
        self.step(nd.info.node_id)

    @rule(dt=st.floats(0.05, 1.0), order=st.permutations(NODES), rounds=st.integers(1, 4))
    def tick(self, dt: float, order: list[str], rounds: int = 1) -> None:
        """``rounds`` times: time moves on by ``dt``, then every running agent acts, in ``order``."""
        for _ in range(rounds):
            self.clock.advance(dt)
            self.kv.expire_leases()
            for n in order:
                nd = self.nodes[n]
                if not nd.paused and nd.active:
                    self._agent(nd)

    def begin_join(self, n: str) -> None:
        nd = self.nodes[n]
        if nd.paused or nd.attempt is not None:
            return
        if nd.watch is not None:
            nd.watch.cancel()
            nd.watch = None
        nd.attempt = JoinAttempt(self.kv, KEYS, nd.info, SETTINGS, nd.membership, wall=self.clock, last=nd.joined)

    def step(self, n: str) -> None:
        nd = self.nodes[n]
        if nd.paused or nd.attempt is None:
            return
        try:
            out = nd.attempt.step(self.clock())
        except (EtcdUnavailableError, EtcdIndeterminateError):
            return
        if isinstance(out, Joined):
            a = out.assignment
            assert a.entry(n) is not None
            assert not nd.history or a.generation > nd.history[-1], (nd.history, a.generation)
            assert Assignment.from_json(self.kv.gens[a.generation]) == a
            nd.history.append(a.generation)
            nd.joined, nd.attempt = out, None
            nd.watch = InlineWatch(self.kv, KEYS, a, out.formed_rev, SETTINGS.max_nodes, lambda reason: None)
            _transient(nd.watch.start)

    @rule(dt=st.floats(1.0, 3.0))
    def long_silence(self, dt: float) -> None:
        """Time passes with nobody running (every lease may expire)."""
        self.clock.advance(dt)
        self.kv.expire_leases()

    @rule(n=node)
    def pause(self, n: str) -> None:
        self.nodes[n].paused = True

    @precondition(lambda self: any(nd.paused for nd in self.nodes.values()))
    @rule(n=node)
    def resume_and_write(self, n: str) -> None:
        nd = self.nodes[n]
        if not nd.paused:
            return
        nd.paused = False
        self._fenced_write(nd)

    @rule(n=node)
    def publish_fault(self, n: str) -> None:
        nd = self.nodes[n]
        if not nd.paused:
            self._fenced_write(nd)

    def _fenced_write(self, nd: Node) -> None:
        if nd.joined is None:
            return
        g = nd.joined.assignment.generation
        self.kv.expire_leases()
        snap = self.kv.snapshot()
        lease = nd.membership.lease
        mine = snap.get(KEYS.node(nd.info.node_id))
        stale = KEYS.gen(g + 1) in snap or lease is None or mine is None or mine.lease != lease
        value = json.dumps({"what": "test"}).encode()
        try:
            fenced_txn(self.kv, KEYS, g, nd.info.node_id, lease, [], [Put(KEYS.fault(g, nd.info.node_id), value)])
            accepted = True
        except FencedError:
            accepted = False
        except (EtcdUnavailableError, EtcdIndeterminateError):
            return
        self.outcomes.append((stale, accepted))
        assert accepted != stale, f"fenced write by {nd.info.node_id} for gen {g}: accepted={accepted} stale={stale}"

    @rule(n=node)
    def leave(self, n: str) -> None:
        nd = self.nodes[n]
        if nd.paused:
            return
        if nd.attempt is not None:
            _transient(nd.attempt.cancel)
            nd.attempt = None
        if nd.watch is not None:
            nd.watch.cancel()
            nd.watch = None
        nd.joined = None
        _transient(nd.membership.revoke)
        nd.active = False

    @rule(n=node)
    def come_back(self, n: str) -> None:
        self.nodes[n].active = True

    @rule()
    def etcd_leader_change(self) -> None:
        self.kv.leader_change()
        self.kv.fail_next(1)

    @rule()
    def indeterminate_txn(self) -> None:
        self.kv.fail_next(1, EtcdIndeterminateError("injected: leader changed mid-transaction"), after=True, ops=["txn"])

    @rule()
    def settle(self) -> None:
        """Liveness: once every node runs steadily (none paused or gone, etcd healthy), the job converges
        within a few lease TTLs: the newest generation holds min(nodes, MAX) of them, each member has
        joined it and nothing ends it, the rest wait as spares."""
        for nd in self.nodes.values():
            nd.paused, nd.active = False, True
        for _ in range(50):
            self.tick(0.2, NODES)
        newest = max(self.kv.gens)
        a = Assignment.from_json(self.kv.gens[newest])
        assert len(a.nodes) == min(len(NODES), SETTINGS.max_nodes), a.node_ids
        for n in a.node_ids:
            nd = self.nodes[n]
            assert nd.joined is not None and nd.joined.assignment.generation == newest, (n, nd.history, newest)
            assert nd.watch is not None and nd.watch.fired is None, (n, nd.watch.fired if nd.watch else None)
        for n in set(NODES) - set(a.node_ids):
            assert self.nodes[n].attempt is not None, f"spare {n} is not waiting"

    @invariant()
    def generations_are_contiguous_and_never_rewritten(self) -> None:
        assert not self.kv.violations, self.kv.violations
        gens = sorted(self.kv.gens)
        assert gens == list(range(1, len(gens) + 1))
        rdzv = self.kv.snapshot().get(KEYS.rdzv)
        if gens:
            assert rdzv is not None and json.loads(rdzv.value)["g"] == gens[-1]

    @invariant()
    def every_member_holds_its_generations_assignment(self) -> None:
        for nd in self.nodes.values():
            if nd.joined is not None:
                g = nd.joined.assignment.generation
                assert Assignment.from_json(self.kv.gens[g]) == nd.joined.assignment

    def teardown(self) -> None:
        self.kv.close()


RendezvousMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=80, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestRendezvousProtocol = RendezvousMachine.TestCase


def test_scenario_forms_then_re_forms_after_a_fault():
    """A fixed walk through the same machinery: 3 nodes form gen 1, a fault makes all three re-form gen 2
    at once (every member back: no last-call wait), keeping their ranks."""
    m = RendezvousMachine()
    for n in ("n0", "n1", "n2"):
        m.begin_join(n)
        m.step(n)
    m.clock.advance(1.0)
    for n in ("n0", "n1", "n2"):
        m.step(n)
    assert [m.nodes[n].history for n in ("n0", "n1", "n2")] == [[1], [1], [1]]
    g1 = m.nodes["n0"].joined.assignment
    assert g1.node_ids == ("n0", "n1", "n2")
    m.publish_fault("n1")
    assert all(m.nodes[n].watch.fired == "fault:n1" for n in ("n0", "n1", "n2"))
    for n in ("n2", "n1", "n0"):
        m.begin_join(n)
        m.step(n)
    m.step("n0")  # n0 holds the closer role; everyone is back, so it closes without waiting
    for n in ("n1", "n2"):
        m.step(n)
    assert [m.nodes[n].history for n in ("n0", "n1", "n2")] == [[1, 2], [1, 2], [1, 2]]
    g2 = m.nodes["n0"].joined.assignment
    assert all(g2.ranks_of(n) == g1.ranks_of(n) for n in ("n0", "n1", "n2"))
    m.teardown()
