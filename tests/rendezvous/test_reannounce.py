"""A follower that announces again after the closer left still joins a generation formed meanwhile that
holds it (through its first announcement's waiting record), instead of waiting for a round that never
comes. Found by the chaos scenario kill-at-repl-commit-before-txn: the restarted agent and its peer each
waited for the other."""

from __future__ import annotations

from resilient.config import Timeouts
from resilient.etcd.fake import FakeKV, ManualClock
from resilient.keys import JobKeys
from resilient.rendezvous.executor import JoinAttempt, Joined
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
