"""EmbeddedEtcd / EmbeddedCluster: a real etcd process that comes up healthy, keeps data across a restart,
reports why it failed to start, and never outlives its owner."""

from __future__ import annotations

import dataclasses
import os

import psutil
import pytest

from resilient.config import EtcdSettings
from resilient.errors import ConfigError, EtcdUnavailableError
from resilient.etcd.client import EtcdKV
from resilient.etcd.server import FAST, EmbeddedEtcd, EtcdServerConfig, find_etcd_binary
from resilient import env


def test_start_is_healthy_restart_keeps_data_and_close_cleans_up() -> None:
    server = EmbeddedEtcd(FAST)
    try:
        assert server.healthy()
        assert server.settings == EtcdSettings(endpoints=(server.endpoint,))
        pid = server.pid
        assert pid is not None and psutil.pid_exists(pid)
        with EtcdKV.connect(server.settings) as kv:
            kv.put("/srv/k", b"kept")
        server.restart()
        assert server.pid != pid
        with EtcdKV.connect(server.settings) as kv:
            assert kv.get("/srv/k").value == b"kept"  # type: ignore[union-attr]
        server.kill()
        assert not server.running()
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        server.close()
    assert not server.root.exists()
    assert not server.running()


def test_a_server_that_cannot_start_reports_its_log() -> None:
    config = dataclasses.replace(FAST, extra_args=("--no-such-flag",), start_timeout=10)
    with pytest.raises(EtcdUnavailableError) as info:
        EmbeddedEtcd(config)
    message = str(info.value)
    assert "exited with code" in message and "no-such-flag" in message


def test_raft_timings_are_validated() -> None:
    with pytest.raises(ConfigError, match="election_ms=100"):
        EtcdServerConfig(heartbeat_ms=50, election_ms=100)


def test_binary_from_environment_must_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(env.ETCD_BINARY, "/nonexistent/etcd")
    with pytest.raises(ConfigError, match="/nonexistent/etcd"):
        find_etcd_binary()
    monkeypatch.delenv(env.ETCD_BINARY)
    assert os.access(find_etcd_binary(), os.X_OK)


def test_cluster_reports_its_leader_and_elects_a_new_one(etcd_cluster) -> None:
    leader = etcd_cluster.leader()
    assert len(etcd_cluster.endpoints) == 3
    with EtcdKV.connect(etcd_cluster.settings) as kv:
        status = kv.status()
        assert status["leader"] != 0
        members = {m["id"]: m for m in kv.member_list()}
        assert f"etcd{leader}" == members[status["leader"]]["name"]
    etcd_cluster.kill(leader)
    assert not etcd_cluster.running(leader)
    assert etcd_cluster.leader() != leader
    etcd_cluster.restart(leader)
    etcd_cluster.wait_healthy()
    assert all(etcd_cluster.running(i) for i in range(3))


def test_a_failed_start_leaves_no_data_directory(tmp_path) -> None:
    config = dataclasses.replace(FAST, extra_args=("--no-such-flag",), base_dir=str(tmp_path))
    with pytest.raises(EtcdUnavailableError):
        EmbeddedEtcd(config)
    assert list(tmp_path.iterdir()) == []
