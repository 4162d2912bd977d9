"""Real etcd for tests, without pytest: ``running_etcd()`` and ``running_cluster()`` / ``EtcdCluster3``.

Any test folder can do::

    from resilient.testing.etcd import running_etcd

    with running_etcd() as etcd:          # an EmbeddedEtcd with fast raft timings, no fsync
        kv = EtcdKV.connect(etcd.settings)  # etcd.endpoints, etcd.settings (EtcdSettings)

Every server is stopped, reaped and its data directory removed when the ``with`` block ends.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator, TypeVar

from resilient.etcd.server import FAST, EmbeddedCluster, EmbeddedEtcd, EtcdServerConfig

__all__ = ["FAST", "EtcdCluster3", "EmbeddedCluster", "EmbeddedEtcd", "running_cluster", "running_etcd", "wait_until"]

T = TypeVar("T")


@contextlib.contextmanager
def running_etcd(config: EtcdServerConfig | None = None) -> Iterator[EmbeddedEtcd]:
    """One healthy etcd member on free loopback ports (``FAST`` timings unless ``config`` is given)."""
    server = EmbeddedEtcd(config or FAST)
    try:
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def running_cluster(n: int = 3, config: EtcdServerConfig | None = None) -> Iterator[EmbeddedCluster]:
    """An ``n``-member etcd cluster on loopback, healthy with a leader."""
    cluster = EmbeddedCluster(n, config or FAST)
    try:
        yield cluster
    finally:
        cluster.close()


def EtcdCluster3(config: EtcdServerConfig | None = None) -> contextlib.AbstractContextManager[EmbeddedCluster]:  # noqa: N802
    """``with EtcdCluster3() as cluster:`` — a 3-member cluster (``cluster.leader()``, ``kill(i)``,
    ``restart(i)``, ``endpoints``, ``settings``)."""
    return running_cluster(3, config)


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll ``predicate`` until it returns a truthy value (returned) or raise AssertionError naming ``what``
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last value: {value!r})")
        time.sleep(interval)
