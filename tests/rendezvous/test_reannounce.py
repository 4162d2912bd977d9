"""A follower that announces again after the closer left still joins a generation formed meanwhile that
holds it (through its first announcement's waiting record), instead of waiting for a round that never
comes. Found by the chaos scenario kill-at-repl-commit-before-txn: the restarted agent and its peer each
waited for the other."""

from __future__ import annotations

from resilient.config import Timeouts
from resilient.etcd.fake import FakeKV, ManualClock
from resilient.keys import JobKeys
from resilient.rendezvous.executor import GenerationWatch, JoinAttempt, Joined
from resilient.rendezvous.membership import Membership
from resilient.rendezvous.model import NodeInfo
from resilient.rendezvous.settings import RendezvousSettings

KEYS = JobKeys("reannounce")
TIMEOUTS = Timeouts.from_lease_ttl(2, last_call=1.0, join_timeout=60.0)
SETTINGS = RendezvousSettings(2, 3, last_call=1.0, join_timeout=60.0, timeouts=TIMEOUTS)


def _node(kv: FakeKV, clock: ManualClock, i: int) -> tuple[NodeInfo, Membership]:
    info = NodeInfo(f"n{i}", f"h{i}", f"127.0.0.1:{4000 + i}", f"127.0.0.1:{5000 + i}", 1, 6000 + i)
    return info, Membership(kv, KEYS, info, TIMEOUTS, clock=clock)


def test_a_generation_formed_while_the_follower_announces_again_is_joined():
    clock = ManualClock(1000.0)
    kv = FakeKV(clock)
    (a, ma), (b, mb), (c, mc) = (_node(kv, clock, i) for i in range(3))
    old_closer = JoinAttempt(kv, KEYS, a, SETTINGS, ma, wall=clock)
    old_closer.step(clock())
    assert old_closer.is_closer
    follower = JoinAttempt(kv, KEYS, b, SETTINGS, mb, wall=clock)
    follower.step(clock())
    assert follower.phase == "follow"

    kv.lease_revoke(ma.lease)  # the closer dies: its closer key and waiting record go with its lease
    closer = JoinAttempt(kv, KEYS, c, SETTINGS, mc, wall=clock)
    formed = None
    for _ in range(40):  # the new closer forms a generation with the follower's waiting record in it
        clock.advance(0.2)
        mb.keepalive_once()
        mc.keepalive_once()
        out = closer.step(clock())
        if isinstance(out, Joined):
            formed = out.assignment
            break
    assert formed is not None and formed.entry("n1") is not None, "the generation holds the follower"

    joined = None
    for _ in range(10):  # only now does the follower see the closer's deletion, and announce again
        clock.advance(0.2)
        mb.keepalive_once()
        out = follower.step(clock())
        if isinstance(out, Joined):
            joined = out.assignment
            break
    assert joined is not None, "the follower never joined the generation that holds it"
    assert joined.generation == formed.generation


FULL = RendezvousSettings(3, 3, last_call=1.0, join_timeout=60.0, timeouts=TIMEOUTS)


def _steps(clock, memberships, attempts: dict, ticks: int, joined: dict) -> dict:
    """Up to ``ticks`` times: time moves on, every lease is kept alive and every attempt not in ``joined``
    steps; stops once all have joined. Returns ``joined`` (name -> Joined), filled in."""
    for _ in range(ticks):
        if len(joined) == len(attempts):
            break
        clock.advance(0.2)
        for m in memberships:
            m.keepalive_once()
        for name, attempt in attempts.items():
            if name not in joined:
                out = attempt.step(clock())
                if isinstance(out, Joined):
                    joined[name] = out
    return joined


def _run(clock, memberships, attempts: dict, joined: dict | None = None) -> dict:
    joined = _steps(clock, memberships, attempts, 60, {} if joined is None else joined)
    assert len(joined) == len(attempts), f"only {sorted(joined)} of {sorted(attempts)} joined"
    return joined


def _watch(kv, j: Joined) -> GenerationWatch:
    w = GenerationWatch(kv, KEYS, j.assignment, j.formed_rev, FULL.max_nodes, lambda reason: None)
    w.start()
    return w


def test_a_newcomer_announcing_again_neither_ends_its_generation_nor_misses_the_next():
    """The CI failure of the host-loss tests (3:3 job): a replacement host announced while the closer was
    a host that had just died. The survivors formed the next generation with the replacement's first
    record; only then did the replacement see the closer's key go and announce again. Its second record,
    newer than that generation, ended it at once (``join:d``); the next generation formed on that stale
    record before the replacement asked in, and the replacement, taking it as already known, waited for
    one more that never came while the others waited for it."""
    clock = ManualClock(1000.0)
    kv = FakeKV(clock)
    nodes = [_node(kv, clock, i) for i in range(4)]
    (a, ma), (b, mb), (c, mc), (d, md) = nodes
    first = _run(clock, [ma, mb, mc], {n.node_id: JoinAttempt(kv, KEYS, n, FULL, m, wall=clock)
                                       for n, m in nodes[:3]})
    assert kv.get(KEYS.closer).value == b"n0"
    watches = {n: _watch(kv, j) for n, j in first.items()}
    newcomer = JoinAttempt(kv, KEYS, d, FULL, md, wall=clock)
    newcomer.step(clock())
    assert newcomer.phase == "follow"  # the job is at MAX: the newcomer waits, the generation goes on
    assert all(w.fired is None for w in watches.values())

    kv.lease_revoke(ma.lease)  # the closer's host dies
    assert watches["n1"].fired == watches["n2"].fired == "node-lost:n0"
    second = _run(clock, [mb, mc], {n.node_id: JoinAttempt(kv, KEYS, n, FULL, m, wall=clock, last=first[n.node_id])
                                    for n, m in nodes[1:3]})
    assert second["n1"].assignment.entry("n3") is not None, "formed with the newcomer's first record"
    late = _run(clock, [mb, mc, md], {"n3": newcomer})["n3"]  # only now does the newcomer step again
    assert late.assignment.generation == second["n1"].assignment.generation
    watches = {n: _watch(kv, j) for n, j in {**second, "n3": late}.items()}
    assert all(w.fired is None for w in watches.values()), {n: w.fired for n, w in watches.items()}

    # a fault ends that generation; the survivors ask in first, the newcomer well after the round's last
    # call: it still joins the next generation, which cannot have formed without it
    gen = late.assignment.generation
    kv.put(KEYS.fault(gen, "n1"), b'{"what":"test"}')
    assert all(w.fired == "fault:n1" for w in watches.values())
    last = {**second, "n3": late}
    attempts = {n.node_id: JoinAttempt(kv, KEYS, n, FULL, m, wall=clock, last=last[n.node_id]) for n, m in nodes[1:]}
    early = _steps(clock, [mb, mc, md], {n: attempts[n] for n in ("n1", "n2")}, 20, {})
    assert early == {}
    third = _run(clock, [mb, mc, md], attempts, joined=early)
    assert {j.assignment.generation for j in third.values()} == {gen + 1}
