"""What the overwrite guard adds to a worker's snapshot, beside one etcd round trip measured in the same run.

Before a snapshot goes over a sealed step newer than the worker's view of the committed one, the worker
asks its agent (``before_overwrite``, the ``Committed`` RPC with ``overwrite_segment``; the RPC itself was
there before, to ask for the committed step). With one node (``LocalSnapshots``) the agent answers from
memory; with several (``ShardManager``) it also takes its claim on that copy off the step's manifest in
etcd: it reads the commit record and the manifest and writes the manifest in one transaction.

Set-up: a real etcd, two ``ShardManager`` hosts on loopback (two copies of each shard), real segments and
transfers. Host 0's rank snapshots step after step as a worker does, host 1's never does, so nothing
commits and every snapshot goes over an uncommitted copy its manifest names: each ``before_overwrite``
takes the whole path. Measured on the agent's side (the gRPC hop to it is unchanged). Baseline: ``get``
of one key from the same etcd, in the same process. The one-node figure is ``LocalSnapshots`` with two
ranks, one of them never sealing.

    python bench/overwrite_guard.py [--snapshots 200]

Prints one JSON line: {"several_nodes_ms", "several_nodes_p90_ms", "etcd_get_ms", "ratio",
"one_node_ms", "snapshots"} (medians; ``ratio`` = several_nodes_ms / etcd_get_ms).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from resilient.elastic.snapshots import keep_for  # noqa: E402
from resilient.store import Segment  # noqa: E402

TOKEN = b"bench-token-0123456789"


def _write(seg: Segment, step: int, keep: int | None) -> None:
    seg.write({"w": torch.full((1 << 16,), float(step))}, step=step, generation=1, meta=b"bench", keep_step=keep)
    seg.seal()


def _timed(times: list[float], ask):
    """``ask``, appending how long each call took to ``times``."""
    def timed():
        t0 = time.perf_counter()
        try:
            return ask()
        finally:
            times.append(time.perf_counter() - t0)
    return timed


def _wait(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for replication to finish")
        time.sleep(0.001)


def several_nodes(kv, snapshots: int, root: str) -> list[float]:
    from resilient.etcd.server import free_ports
    from resilient.keys import JobKeys
    from resilient.rendezvous.model import Assignment, NodeEntry, NodeInfo
    from resilient.replication.manager import ShardManager
    from resilient.testing.fence import NodeFence

    keys = JobKeys(f"bench-guard-{os.getpid()}")
    mgrs = []
    for i in range(2):
        p1, p2 = free_ports(2)
        node = NodeInfo(f"n{i}", f"host{i}", f"127.0.0.1:{p1}", f"127.0.0.1:{p2}", 1, 0)
        shm = os.path.join(root, f"node{i}")
        os.makedirs(shm)
        mgr = ShardManager(kv, keys, node, replicas=2, token=TOKEN, rendezvous=NodeFence(kv, keys, node), shm_dir=shm)
        mgr.start()
        mgrs.append((mgr, shm))
    try:
        entries = tuple(NodeEntry(m.node.node_id, m.node.host, m.node.addr, m.node.bulk_addr, k, (k,))
                        for k, (m, _) in enumerate(mgrs))
        assignment = Assignment(1, 2, entries, "127.0.0.1", 1, time.time())
        kv.put(keys.gen(1), assignment.to_json())
        for m, _ in mgrs:
            m.on_generation(assignment)
        mgr, shm = mgrs[0]
        seg = Segment.open(mgr.segment_for(0, (1 << 18) + 4096), shm)
        times = []
        try:
            for step in range(1, snapshots + 3):
                answer = keep_for(seg, None, _timed(times, lambda: mgr.before_overwrite(0, seg.name)))
                if answer.skip:
                    raise SystemExit(f"before_overwrite skipped: {answer.reason}")
                _write(seg, step, answer.committed)
                mgr.on_sealed(0, step, 1, seg.slots()[0].nbytes)
                _wait(lambda: mgr.idle() and mgrs[1][0].idle())
        finally:
            seg.close()
        if mgr.committed_step() is not None:
            raise SystemExit("a step committed although host 1 never snapshotted: the set-up is wrong")
        return times
    finally:
        for m, _ in mgrs:
            m.close(unlink=True)


def one_node(snapshots: int, root: str) -> list[float]:
    from resilient.agent.snapshots import LocalSnapshots

    shm = os.path.join(root, "one")
    os.makedirs(shm)
    snaps = LocalSnapshots(job=f"bench-guard-{os.getpid()}", node="n0", shm_dir=shm)
    snaps.on_generation((0, 1), 2, generation=1)
    snaps.segment_for(1, 4096)
    name = snaps.segment_for(0, (1 << 18) + 4096)
    seg = Segment.open(name, shm)
    times = []
    try:
        for step in range(1, snapshots + 3):
            _write(seg, step, keep_for(seg, None, _timed(times, lambda: snaps.before_overwrite(0, name))).committed)
            snaps.on_sealed(0, step, 1, 100)
    finally:
        seg.close()
        snaps.close(unlink=True)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--snapshots", type=int, default=200)
    args = ap.parse_args()
    from resilient.etcd.client import EtcdKV
    from resilient.testing.etcd import running_etcd

    root = tempfile.mkdtemp(prefix="rsl-guard-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        with running_etcd() as etcd:
            kv = EtcdKV.connect(etcd.settings)
            try:
                kv.put("/bench/probe", b"x")
                gets = []
                for _ in range(args.snapshots):
                    t0 = time.perf_counter()
                    kv.get("/bench/probe")
                    gets.append(time.perf_counter() - t0)
                guarded = several_nodes(kv, args.snapshots, root)
            finally:
                kv.close()
        local = one_node(args.snapshots, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ms = lambda xs: round(1000 * statistics.median(xs), 3)  # noqa: E731
    print(json.dumps({
        "several_nodes_ms": ms(guarded),
        "several_nodes_p90_ms": round(1000 * statistics.quantiles(guarded, n=10)[-1], 3),
        "etcd_get_ms": ms(gets),
        "ratio": round(statistics.median(guarded) / statistics.median(gets), 2),
        "one_node_ms": ms(local),
        "snapshots": len(guarded),
    }))


if __name__ == "__main__":
    main()
