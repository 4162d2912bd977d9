"""Three ``resilient-run`` agents as three hosts (each with its own shared-memory directory) against one
etcd on loopback. One host dies at once with its agent, workers and shared memory; a fresh host replaces
it (``--nnodes 3:3``: the job waits for it). The newcomer restores the lost rank's committed shard from a
surviving peer's replica (origin ``peer:<node>``), the job continues from the last committed step, and
the final weights are bitwise equal to a fault-free run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid

import pytest

from tests.agent.conftest import ROOT, Launched, report

SCRIPT = str(ROOT / "chaos" / "train_chaos.py")
STEPS = 36


@pytest.fixture(scope="module")
def etcd_server():
    from resilient.testing.etcd import running_etcd

    with running_etcd() as server:
        yield server


@pytest.fixture
def hosts(tmp_path):
    root = tempfile.mkdtemp(prefix="rsl-e2e-hosts-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    started: list[Launched] = []

    def start(name: str, addr: str, args: list[str]) -> Launched:
        """One host: its own node id, loopback address (so placement sees distinct hosts) and shm dir."""
        shm = os.path.join(root, name)
        os.makedirs(shm, exist_ok=True)
        run = Launched(["--node-id", name, "--local-addr", addr, *args], tmp_path, name, {"RESILIENT_SHM_DIR": shm})
        run.shm = shm
        started.append(run)
        return run

    yield start
    for run in started:
        run.kill()
    report(started)
    shutil.rmtree(root, ignore_errors=True)


def reference_hash(tmp_path) -> str:
    out = tmp_path / "reference.hash"
    subprocess.run([sys.executable, SCRIPT, "--steps", str(STEPS), "--hash-out", str(out)], cwd=str(ROOT),
                   env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=240)
    return out.read_text().strip()


def test_lost_host_is_restored_from_peer_replicas_bitwise(etcd_server, hosts, tmp_path):
    job = f"e2e-hostloss-{uuid.uuid4().hex[:8]}"
    common = ["--nnodes", "3:3", "--nproc-per-node", "1", "--rdzv-endpoint", etcd_server.endpoints[0],
              "--rdzv-id", job, "--lease-ttl", "2", "--replicas", "2", "--max-restarts", "3",
              SCRIPT, "--steps", str(STEPS), "--step-sleep-ms", "150"]
    a, b, c = (hosts(n, f"127.0.0.{k + 1}", common) for k, n in enumerate(("a", "b", "c")))
    committed = b.wait_event(lambda e: e["kind"] == "ckpt.committed" and e["step"] >= 6, 180,
                             "a committed step past 6")["step"]

    os.killpg(a.proc.pid, signal.SIGKILL)  # the host: its agent and workers at once ...
    a.proc.wait(10)
    shutil.rmtree(a.shm, ignore_errors=True)  # ... and its shared memory
    d = hosts("d", "127.0.0.4", common)

    restored = d.wait_event(lambda e: e["kind"] == "restore.done", 180, "the replacement host's restore")
    assert restored["origin"].startswith("peer:"), restored
    assert restored["origin"] in ("peer:b", "peer:c")
    assert restored["verified"] is True
    assert restored["step"] >= committed, "the restore uses the last committed step"
    for run in (b, c, d):
        assert run.wait(240) == 0, run.output()[-4000:]
    hashes = {e["state_hash"] for run in (b, c, d) for e in run.events("train.done") if e.get("state_hash")}
    assert hashes == {reference_hash(tmp_path)}
    worlds = {e["world_size"] for e in d.events("step.done")}
    assert worlds == {3}
