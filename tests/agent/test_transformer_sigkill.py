"""Exact resume of a small transformer under ``resilient-run``: a worker SIGKILLed mid-run with the world size
unchanged ends with weights and optimizer state bitwise equal to a fault-free run (issue 4)."""

from __future__ import annotations

import os
import signal

from resilient.testing.etcd import wait_until
from tests.agent.conftest import SCRIPTS, worker_pids

SCRIPT = str(SCRIPTS / "transformer_train.py")
BASE = ["--standalone", "--nproc-per-node", "2", "--lease-ttl", "2"]
STEPS = 30
VICTIM = 1
HOLD_AT = 8  # both ranks of the faulted run wait after this step until the victim is killed


def _final_hashes(run) -> dict[int, str]:
    done = run.events("train.done")
    by_rank = {e["rank"]: e["state_hash"] for e in done}
    assert len(done) == 2 and sorted(by_rank) == [0, 1], f"one train.done per rank: {done}"
    assert all(e["step"] == STEPS for e in done), done
    return by_rank


def test_sigkilled_worker_resumes_a_transformer_bitwise_equal_to_a_fault_free_run(launch, tmp_path):
    args = [SCRIPT, "--steps", str(STEPS)]
    clean = launch([*BASE, *args], name="clean")
    assert clean.wait(120) == 0, clean.output()
    reference = _final_hashes(clean)
    assert reference[0] == reference[1] and reference[0], "data-parallel ranks end with the same state"
    assert not clean.events("restore.done")

    hold = tmp_path / "hold"
    hold.mkdir()
    faulted = launch([*BASE, *args, "--hold-at-step", str(HOLD_AT), "--hold-dir", str(hold)], name="faulted")
    wait_until(lambda: all((hold / f"held-{r}").exists() for r in (0, 1)), 120, f"both ranks past step {HOLD_AT}")
    def newest_commit() -> int:
        return max((e["step"] for e in faulted.events("ckpt.committed")), default=0)

    committed = wait_until(lambda: newest_commit() >= 4 and newest_commit(), 60, "a commit of step 4 or later")
    victim = worker_pids(faulted, VICTIM)[0]
    os.kill(victim, signal.SIGKILL)
    (hold / "release").touch()  # the survivor goes on, meets the dead peer in its next collective
    assert faulted.wait(120) == 0, faulted.output()

    exits = [e for e in faulted.events("worker.exit") if e["signal"] == signal.SIGKILL]
    assert [e["pid"] for e in exits] == [victim], exits
    assert len(worker_pids(faulted, VICTIM)) == 2, "the killed worker is respawned once"
    restores = faulted.events("restore.done")
    assert {e["rank"] for e in restores} == {0, 1}, f"both ranks restore the committed snapshot: {restores}"
    assert all(e["verified"] is True for e in restores), restores
    assert all(committed <= e["step"] < STEPS for e in restores), f"restored mid-run: {restores}"
    assert len({e["step"] for e in restores}) == 1, f"both ranks restore the same step: {restores}"

    assert _final_hashes(faulted) == reference, "the recovered run ends bitwise equal to the fault-free one"
