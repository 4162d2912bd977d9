"""Fixtures for the etcd tests: real embedded etcd servers (one shared per session, fresh ones, a 3-member
cluster) and the ``kv`` fixture that runs the contract suite over both ``EtcdKV`` and ``FakeKV``.

Other test folders should use the pytest-independent helpers in ``resilient.testing.etcd``."""

from __future__ import annotations

import itertools
from typing import Iterator

import pytest

from resilient.etcd.server import FAST, EmbeddedCluster, EmbeddedEtcd
from resilient.testing.etcd import running_cluster, running_etcd

_prefix_counter = itertools.count()


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EmbeddedEtcd]:
    """One real etcd shared by the session (tests keep to their own key prefix)."""
    with running_etcd(FAST) as server:
        yield server


@pytest.fixture
def fresh_etcd() -> Iterator[EmbeddedEtcd]:
    """A real etcd of this test's own (for tests that stop, kill or reconfigure it)."""
    with running_etcd(FAST) as server:
        yield server


@pytest.fixture
def etcd_cluster() -> Iterator[EmbeddedCluster]:
    """A healthy 3-member etcd cluster on loopback."""
    with running_cluster(3, FAST) as cluster:
        yield cluster


@pytest.fixture
def etcd_kv(etcd_server: EmbeddedEtcd):
    """An ``EtcdKV`` connected to the shared server."""
    from resilient.etcd.client import EtcdKV

    kv = EtcdKV.connect(etcd_server.settings)
    try:
        yield kv
    finally:
        kv.close()


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix no other test uses (the shared server outlives each test)."""
    return f"/t{next(_prefix_counter)}-{request.node.name[:40]}/"


@pytest.fixture(params=["etcd", "fake"])
def kv(request: pytest.FixtureRequest):
    """The KVStore under test: a real etcd through ``EtcdKV``, or the in-memory ``FakeKV``."""
    if request.param == "etcd":
        yield request.getfixturevalue("etcd_kv")
    else:
        from resilient.etcd.fake import FakeKV

        fake = FakeKV()
        try:
            yield fake
        finally:
            fake.close()
