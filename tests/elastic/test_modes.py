"""The decorated example scripts as real processes: ``python script.py`` (world size 1), an in-process
recovery that must end bitwise equal to the fault-free run, and plain torchrun (in-memory recovery off)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from resilient import events
from tests.elastic.conftest import REPO, SCRIPTS, script_env

HASH = re.compile(r"STATE_HASH ([0-9a-f]{64}) rank=(\d+) world=(\d+) restarts=(\d+)")


def run_script(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


def hashes(stdout: str) -> list[tuple[str, int, int, int]]:
    return [(h, int(r), int(w), int(n)) for h, r, w, n in HASH.findall(stdout)]


@pytest.mark.parametrize("script, regen_at", [("mlp_train.py", "12"), ("transformer_train.py", "9")])
def test_single_process_run_and_in_process_recovery_end_bitwise_equal(script, regen_at, shm_dir, tmp_path):
    path = os.path.join(SCRIPTS, script)
    clean_log = tmp_path / "clean.jsonl"
    clean = run_script([path], script_env(shm_dir, RESILIENT_EVENT_LOG=str(clean_log)))
    [(clean_hash, rank, world, restarts)] = hashes(clean.stdout)
    assert (rank, world, restarts) == (0, 1, 0)
    done = [e for e in events.read(str(clean_log)) if e["kind"] == "train.done"]
    assert len(done) == 1 and done[0]["state_hash"] == clean_hash

    log = tmp_path / "recover.jsonl"
    recovered = run_script([path], script_env(shm_dir, LOCAL_REGEN_AT=regen_at, RESILIENT_EVENT_LOG=str(log)))
    [(recovered_hash, _, _, restarts)] = hashes(recovered.stdout)
    assert restarts == 1
    assert recovered_hash == clean_hash
    kinds = [e["kind"] for e in events.read(str(log))]
    assert kinds.count("recover.begin") == 1 and kinds.count("recover.done") == 1
    restored = [e for e in events.read(str(log)) if e["kind"] == "restore.done"]
    assert [e["step"] for e in restored] == [int(regen_at) + 1] and restored[0]["verified"] is True
    assert os.listdir(shm_dir) == []  # the run removed its segments


def test_torchrun_mode_completes_and_warns_once_per_rank(shm_dir):
    proc = run_script(
        [
            "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
            os.path.join(SCRIPTS, "mlp_train.py"),
        ],
        script_env(shm_dir, STEPS="10"),
    )
    found = hashes(proc.stdout)
    assert sorted((r, w) for _, r, w, _ in found) == [(0, 2), (1, 2)]
    assert len({h for h, *_ in found}) == 1  # DDP keeps both ranks identical
    assert proc.stderr.count("in-memory recovery is off") == 2
    assert os.listdir(shm_dir) == []  # no snapshots under plain torchrun


def _two_pg_workers(script: str, shm_dir, *, wait_rank1: bool):
    """Ranks 0 and 1 of ``script`` over a TCPStore hosted here (as the group-rank-0 agent hosts it); rank 0
    run to its end (its stdout and stderr returned), rank 1 waited for or killed."""
    import torch.distributed as dist

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    procs = [
        subprocess.Popen([sys.executable, os.path.join(SCRIPTS, script), str(server.port), str(r)],
                         env=script_env(shm_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        for r in (0, 1)
    ]
    try:
        out0, err0 = procs[0].communicate(timeout=120)
        if wait_rank1:
            procs[1].wait(timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return procs, out0, err0


def test_gloo_peer_loss_is_a_collective_failure_and_the_group_reforms(shm_dir):
    """Agent-style bootstrap: a TCPStore server here (as the group-rank-0 agent hosts it), two workers
    using per-generation prefixes; one is SIGKILLed mid-run, the other recovers in-process."""
    procs, out0, err0 = _two_pg_workers("pg_peer_loss.py", shm_dir, wait_rank1=True)
    assert procs[1].returncode == -9
    assert procs[0].returncode == 0, f"stdout:\n{out0}\nstderr:\n{err0[-3000:]}"
    match = re.search(r"RECOVERED detect_s=([0-9.]+)", out0)
    assert match, out0
    assert float(match.group(1)) < 30  # seen from the closed connection, not a 60 s collective timeout


def test_a_gloo_collective_blocked_on_a_stalled_peer_fails_when_the_generation_is_aborted(shm_dir):
    """A peer that stops answering without closing its connections (SIGSTOP: a frozen host, a process the
    kernel is still tearing down) fails nothing by itself; ``abort_collectives`` for a newer generation
    releases the blocked all-reduce at once, and the group reforms over the same store."""
    procs, out0, err0 = _two_pg_workers("pg_stalled_peer.py", shm_dir, wait_rank1=False)
    assert procs[0].returncode == 0, f"stdout:\n{out0}\nstderr:\n{err0[-3000:]}"
    match = re.search(r"RELEASED after_s=([0-9.]+) connections=(\d+) same_gen=(\d+)", out0)
    assert match, out0
    assert float(match.group(1)) < 20, "released by the abort, not by the 60 s group timeout"
    assert int(match.group(2)) >= 1, "the group's connection to the peer was shut down"
    assert int(match.group(3)) == 0, "an abort for the current generation does nothing"
