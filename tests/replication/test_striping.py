"""Striped restore across holders: ShardManagers on loopback against a real etcd. A shard held by three
surviving peers is pulled from all three at once in disjoint byte ranges (``Pull`` with a range, each
stripe verified chunk by chunk by the receiver), bit for bit; a holder with a corrupt copy is reported
and its stripe is fetched from another holder; and a rate-limited holder paces its stripe."""

from __future__ import annotations

import time

import torch

from resilient import events
from resilient.replication.commit import read_manifests
from tests.replication.conftest import state

N = 300_000  # floats: a 1.2 MB shard, cut into 64 KiB-aligned stripes




def four_hosts_all_holding(make_cluster, step: int):
    c = make_cluster(4, replicas=4)  # every shard on every host: losing one leaves three holders
    c.form(1, [0, 1, 2, 3])
    for k in range(4):
        c.seal(k, k, step, state(k, step, N))
    c.wait_committed(step, [0, 1, 2, 3])
    c.kill(0)
    c.add_node(0, "host0")
    c.mgrs[0].stripe_min_bytes = 0
    return c, c.form(2, [0, 1, 2, 3])


def test_shard_is_pulled_in_stripes_from_three_holders_bit_exact(make_cluster, event_log):
    c, a = four_hosts_all_holding(make_cluster, 6)
    holders = [h for h in read_manifests(c.kv, c.keys, 1, 6)[0].holders if h != "n0"]
    assert len(holders) == 3
    sent_before = {i: c.mgrs[i].stats.sent_bytes for i in (1, 2, 3)}
    src = c.mgrs[0].prepare_restore(0, a)
    assert src.step == 6 and src.source_rank == 0
    assert src.origin == "peer:" + "+".join(sorted(holders))
    assert torch.equal(c.read(0, src), state(0, 6, N))
    shard = N * 4
    for i in (1, 2, 3):  # each holder sent about a third of the shard, none the whole of it
        sent = c.mgrs[i].stats.sent_bytes - sent_before[i]
        assert shard / 3 - (128 << 10) < sent < shard / 2, (i, sent)
    plans = [e for e in events.read(event_log) if e["kind"] == "restore.plan" and e["rank"] == 0]
    assert plans and plans[-1]["origin"] == src.origin


def test_a_corrupt_holder_is_reported_and_its_stripe_comes_from_another(make_cluster, event_log):
    c, a = four_hosts_all_holding(make_cluster, 3)
    seg, slot = c.mgrs[2].local.find(0, 3, 1)[0]
    buf = seg.slot_buffer(slot)
    buf[1000] ^= 0xFF
    buf.release()
    src = c.mgrs[0].prepare_restore(0, a)
    assert torch.equal(c.read(0, src), state(0, 3, N))
    assert "n2" not in src.origin
    failed = [e for e in events.read(event_log) if e["kind"] == "ckpt.verify_failed"]
    assert failed and failed[0]["holder"] == "n2" and failed[0]["rank"] == 0


def test_whole_pull_when_striping_is_off(make_cluster):
    c, a = four_hosts_all_holding(make_cluster, 2)
    c.mgrs[0].stripe_min_bytes = 1 << 40
    src = c.mgrs[0].prepare_restore(0, a)
    assert src.origin.count("+") == 0 and src.origin.startswith("peer:n")
    assert torch.equal(c.read(0, src), state(0, 2, N))


def test_a_rate_limited_holder_paces_inside_the_transfer(make_cluster):
    """The holder reserves each piece of PACE_BYTES before it goes out (not the shard once), and the waits
    its pacer asks for add up to the shard's bytes over the rate."""
    from resilient.replication.ratelimit import PACE_BYTES, Pacer

    c, a = four_hosts_all_holding(make_cluster, 4)
    c.mgrs[0].stripe_min_bytes = 1 << 40  # one holder sends the whole shard
    rate = 4 << 20
    calls, slept = [], []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        time.sleep(seconds)

    pacer = Pacer(rate, 0, sleep=sleep)  # as --replication-rate 4 MiB/s, no burst

    def pace(n: int) -> None:
        calls.append(n)
        pacer(n)

    for i in (1, 2, 3):
        c.mgrs[i]._pace = pace
    began = time.monotonic()
    src = c.mgrs[0].prepare_restore(0, a)
    elapsed = time.monotonic() - began
    assert torch.equal(c.read(0, src), state(0, 4, N))
    nbytes = read_manifests(c.kv, c.keys, 1, 4)[0].nbytes
    assert sum(calls) == nbytes and len(calls) == -(-nbytes // PACE_BYTES) >= 2, (calls, nbytes)
    assert 0.9 * nbytes / rate <= sum(slept) <= nbytes / rate, (slept, nbytes / rate)
    assert elapsed >= sum(slept)
