"""Data-parallel deduplication end to end (``RESILIENT_DEDUP=1``: each rank snapshots only its slice of
model and optimizer): real ``resilient-run`` agents and workers on loopback.

* One host, two ranks: a worker is SIGKILLed; it is respawned and restores by reassembling both ranks'
  slices from this host's segments; the final state hash equals the fault-free run's.
* Three hosts: one host dies at once (agent, workers, shared memory); the replacement pulls the slices
  of all three ranks from the surviving peers, and the final hash equals the fault-free run's.
Each sealed snapshot is a fraction of the whole state (``snapshot.sealed`` bytes)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid

from tests.agent.conftest import ROOT
from tests.replication.test_host_loss_e2e import etcd_server, hosts  # noqa: F401 - fixtures

SCRIPT = str(ROOT / "chaos" / "train_chaos.py")
STEPS = 30
TRAIN = ["--steps", str(STEPS), "--hidden", "256", "--step-sleep-ms", "120"]


def reference(tmp_path) -> tuple[str, int]:
    """The fault-free hash (one process, no dedup) and the bytes of the whole model + optimizer state."""
    out = tmp_path / "reference.hash"
    subprocess.run([sys.executable, SCRIPT, "--steps", str(STEPS), "--hidden", "256", "--hash-out", str(out)],
                   cwd=str(ROOT), env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=240)
    params = 16 * 256 + 256 + 256 + 1
    return out.read_text().strip(), params * 8 * 3  # float64 weights, Adam exp_avg and exp_avg_sq


def sealed_bytes(run) -> set[int]:
    return {e["bytes"] for e in run.events("snapshot.sealed")}


def test_worker_killed_restores_from_local_slices_bitwise(etcd_server, hosts, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("RESILIENT_DEDUP", "1")  # the agents pass it on to their workers
    job = f"e2e-dedup1-{uuid.uuid4().hex[:8]}"
    a = hosts("a", "127.0.0.1", ["--nnodes", "1", "--nproc-per-node", "2", "--rdzv-endpoint", etcd_server.endpoints[0],
                                 "--rdzv-id", job, "--max-restarts", "3", SCRIPT, *TRAIN])
    a.wait_event(lambda e: e["kind"] == "ckpt.committed" and e["step"] >= 6, 180, "a committed step past 6")
    victim = next(e for e in a.events("worker.start") if e["rank"] == 1)
    os.kill(victim["pid"], signal.SIGKILL)
    restored = a.wait_event(lambda e: e["kind"] == "restore.done" and e["step"] >= 6, 180, "the respawned rank's restore")
    assert restored["verified"] is True
    assert a.wait(240) == 0, a.output()[-4000:]
    want, whole = reference(tmp_path)
    assert {e["state_hash"] for e in a.events("train.done") if e.get("state_hash")} == {want}
    # half the shared state + per-rank RNG states, the meta and alignment (~15 kB with this small model)
    assert max(sealed_bytes(a)) < whole / 2 + 20_000, (sealed_bytes(a), whole)


def test_lost_host_restores_from_peer_slices_bitwise(etcd_server, hosts, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("RESILIENT_DEDUP", "1")
    job = f"e2e-dedup3-{uuid.uuid4().hex[:8]}"
    common = ["--nnodes", "3:3", "--nproc-per-node", "1", "--rdzv-endpoint", etcd_server.endpoints[0],
              "--rdzv-id", job, "--lease-ttl", "2", "--replicas", "2", "--max-restarts", "3", SCRIPT, *TRAIN]
    a, b, c = (hosts(n, f"127.0.0.{k + 1}", common) for k, n in enumerate(("a", "b", "c")))
    b.wait_event(lambda e: e["kind"] == "ckpt.committed" and e["step"] >= 6, 180, "a committed step past 6")
    os.killpg(a.proc.pid, signal.SIGKILL)
    a.proc.wait(10)
    shutil.rmtree(a.shm, ignore_errors=True)
    d = hosts("d", "127.0.0.4", common)
    restored = d.wait_event(lambda e: e["kind"] == "restore.done", 180, "the replacement host's restore")
    assert restored["origin"].startswith("peer:") and restored["verified"] is True
    assert "from 3 slices (dedup)" in d.output(), "the replacement reassembled the step from all three slices"
    for run in (b, c, d):
        assert run.wait(240) == 0, run.output()[-4000:]
    want, whole = reference(tmp_path)
    hashes = {e["state_hash"] for run in (b, c, d) for e in run.events("train.done") if e.get("state_hash")}
    assert hashes == {want}
    assert max(sealed_bytes(b) | sealed_bytes(d)) < whole / 3 + 20_000, (sealed_bytes(b), whole)
