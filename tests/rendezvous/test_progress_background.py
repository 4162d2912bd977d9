"""The agent's progress report never waits on etcd: with ``wait=False`` the due write runs on a
background thread (one at a time), so a slow etcd link cannot stall the agent's monitor loop; the
value still lands in ``progress/<node>`` once etcd answers."""

from __future__ import annotations

import json
import threading
from typing import Iterator

import pytest

from resilient.config import Timeouts
from resilient.etcd.client import EtcdKV
from resilient.keys import JobKeys
from resilient.rendezvous import NodeInfo
from resilient.rendezvous.membership import Membership
from resilient.testing.etcd import running_etcd, wait_until

TIMEOUTS = Timeouts.from_lease_ttl(2, last_call=0.3, join_timeout=30.0)


class SlowPuts:
    """A real etcd client whose progress puts wait until ``release`` is set (a link that stopped moving)."""

    def __init__(self, kv: EtcdKV) -> None:
        self._kv = kv
        self.release = threading.Event()
        self.entered = threading.Event()
        self.puts = 0

    def put(self, key, value, lease=None):
        self.puts += 1
        self.entered.set()
        self.release.wait(30)
        return self._kv.put(key, value, lease=lease)

    def __getattr__(self, name):
        return getattr(self._kv, name)


@pytest.fixture(scope="module")
def kv() -> Iterator[EtcdKV]:
    with running_etcd() as server:
        client = EtcdKV.connect(server.settings)
        yield client
        client.close()


def test_background_report_returns_while_etcd_is_stuck_and_lands_later(kv):
    keys = JobKeys("progress-bg")
    slow = SlowPuts(kv)
    m = Membership(slow, keys, NodeInfo("n0", "127.0.0.1", "127.0.0.1:1", "127.0.0.1:2", 1, 3), TIMEOUTS)
    lease = m.ensure()
    try:
        m.report_progress(7, 1, wait=False)  # returns although the put cannot finish yet
        assert slow.entered.wait(10), "the write was never started"
        m.report_progress(8, 1, wait=False)
        m.report_progress(9, 1, wait=False)
        assert slow.puts == 1, "the later reports wait for the stuck write (pending), not pile up"
        assert kv.get(keys.progress("n0")) is None
        slow.release.set()
        wait_until(lambda: kv.get(keys.progress("n0")) is not None, 10, "the progress write")
        assert json.loads(kv.get(keys.progress("n0")).value)["step"] == 7
        m.flush_progress()  # what the keep-alive thread does after its next keep-alive
        assert json.loads(kv.get(keys.progress("n0")).value)["step"] == 9
    finally:
        slow.release.set()
        kv.lease_revoke(lease)
