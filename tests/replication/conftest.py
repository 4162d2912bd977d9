"""A loopback cluster of ShardManagers ("hosts") against a real etcd, with real segments in a private shm
directory, real bulk TCP and real gRPC; fencing is the rendezvous' own ``fenced_txn`` over per-node leases."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest
import torch

from resilient import events
from resilient.elastic.snapshots import keep_for
from resilient.etcd.client import EtcdKV
from resilient.etcd.server import free_ports
from resilient.keys import JobKeys
from resilient.rendezvous.model import Assignment, NodeEntry, NodeInfo
from resilient.replication.manager import ShardManager
from resilient.store import Segment
from resilient.testing.etcd import running_etcd, wait_until
from resilient.testing.fence import NodeFence

TOKEN = b"job-token-0123456789"


@pytest.fixture(scope="module")
def etcd_kv():
    with running_etcd() as server:
        kv = EtcdKV.connect(server.settings)
        try:
            yield kv
        finally:
            kv.close()


def state(rank: int, step: int, n: int = 50_000) -> torch.Tensor:
    """The tensor rank ``rank`` seals at ``step`` (``n`` floats, a pure function of both)."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(n, generator=g)


class Cluster:
    def __init__(self, kv, job: str, n: int, replicas: int, root: str, token: bytes = TOKEN, hosts=None) -> None:
        self.kv, self.keys, self.replicas, self.root, self.token = kv, JobKeys(job), replicas, root, token
        self.nodes: list[NodeInfo] = []
        self.fences: list[NodeFence] = []
        self.mgrs: list[ShardManager | None] = []
        hosts = hosts or [f"host{i}" for i in range(n)]
        for i in range(n):
            self.add_node(i, hosts[i])
        self.assignment: Assignment | None = None

    def shm(self, i: int) -> str:
        d = os.path.join(self.root, f"node{i}")
        os.makedirs(d, exist_ok=True)
        return d

    def add_node(self, i: int, host: str, **kwargs) -> ShardManager:
        p1, p2 = free_ports(2)
        node = NodeInfo(f"n{i}", host, f"127.0.0.1:{p1}", f"127.0.0.1:{p2}", 1, 0)
        fence = NodeFence(self.kv, self.keys, node)
        mgr = ShardManager(self.kv, self.keys, node, replicas=self.replicas, token=kwargs.pop("token", self.token),
                           rendezvous=fence, shm_dir=self.shm(i), **kwargs)
        mgr.start()
        if i < len(self.nodes):
            self.nodes[i], self.fences[i], self.mgrs[i] = node, fence, mgr
        else:
            self.nodes.append(node)
            self.fences.append(fence)
            self.mgrs.append(mgr)
        return mgr

    def form(self, generation: int, members: list[int]) -> Assignment:
        """Generation ``generation`` of ``members`` (one rank each, in order), published and announced."""
        entries = tuple(
            NodeEntry(self.nodes[i].node_id, self.nodes[i].host, self.nodes[i].addr, self.nodes[i].bulk_addr, k, (k,))
            for k, i in enumerate(members)
        )
        a = Assignment(generation, len(members), entries, "127.0.0.1", 1, time.time())
        self.kv.put(self.keys.gen(generation), a.to_json())
        for i in members:
            self.mgrs[i].on_generation(a)
        self.assignment = a
        return a

    def seal(self, i: int, rank: int, step: int, tensor: torch.Tensor, as_worker: bool = False) -> None:
        """Write a rank's state into the agent's segment, seal, tell the agent. ``as_worker``: as a worker
        does it (``SnapshotWriter.keep_step``): before going over a sealed step newer than the committed one,
        ask the agent (``keep_for``, ``before_overwrite``) and keep the step it answers."""
        mgr = self.mgrs[i]
        nbytes = tensor.numel() * tensor.element_size() + 4096
        seg = Segment.open(mgr.segment_for(rank, nbytes), self.shm(i))
        try:
            keep = None
            if as_worker:
                answer = keep_for(seg, mgr.committed_step(), lambda: mgr.before_overwrite(rank, seg.name))
                assert not answer.skip, answer.reason
                keep = answer.committed
            seg.write({"w": tensor}, step=step, generation=self.assignment.generation, meta=f"rank{rank}".encode(),
                      keep_step=keep)
            seg.seal()
        finally:
            seg.close()
        mgr.on_sealed(rank, step, self.assignment.generation, nbytes)

    def read(self, i: int, src) -> torch.Tensor:
        """The tensor a worker on host ``i`` restores from the ``RestoreSource`` its agent planned."""
        seg = Segment.open(src.segment, self.shm(i))
        try:
            return seg.read(step=src.step).tensors["w"]
        finally:
            seg.close()

    def kill(self, i: int) -> None:
        """The host dies: its agent stops, its shared memory is gone, its lease is revoked."""
        self.mgrs[i].close(unlink=True)
        shutil.rmtree(self.shm(i), ignore_errors=True)
        self.fences[i].revoke()

    def wait_committed(self, step: int, members: list[int], timeout: float = 30.0) -> None:
        wait_until(lambda: all(self.mgrs[i].committed_step() == step for i in members), timeout, f"commit of step {step}")

    def wait_idle(self, members: list[int], timeout: float = 30.0) -> None:
        wait_until(lambda: all(self.mgrs[i].idle() for i in members), timeout, "replication to finish")

    def close(self) -> None:
        for m in self.mgrs:
            if m is not None:
                m.close(unlink=True)
        for f in self.fences:
            try:
                f.revoke()
            except Exception as exc:  # noqa: BLE001 - a lease already gone is fine at teardown
                print(f"lease revoke at teardown: {exc}")


@pytest.fixture
def shm_root():
    root = tempfile.mkdtemp(prefix="rsl-repl-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def event_log(tmp_path):
    path = str(tmp_path / "events.jsonl")
    events.open_log(path)
    yield path
    events.open_log(None)


@pytest.fixture
def make_cluster(etcd_kv, shm_root, request):
    made = []
    counter = [0]

    def make(n: int = 3, replicas: int = 2, hosts=None) -> Cluster:
        counter[0] += 1
        c = Cluster(etcd_kv, f"{request.node.name[:40]}-{counter[0]}", n, replicas, shm_root, hosts=hosts)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()
