"""Exact resume of a small transformer under ``resilient-run``: a worker SIGKILLed mid-run with the world size
unchanged ends with weights and optimizer state bitwise equal to a fault-free run (issue 4)."""

from __future__ import annotations

import os
import signal

from tests.agent.conftest import SCRIPTS, step_done, worker_pids

SCRIPT = str(SCRIPTS / "transformer_train.py")
BASE = ["--standalone", "--nproc-per-node", "2", "--lease-ttl", "2"]
STEPS = 30
VICTIM = 1


def _final_hashes(run) -> dict[int, str]:
    done = run.events("train.done")
    by_rank = {e["rank"]: e["state_hash"] for e in done}
    assert len(done) == 2 and sorted(by_rank) == [0, 1], f"one train.done per rank: {done}"
    assert all(e["step"] == STEPS for e in done), done
    return by_rank


def test_sigkilled_worker_resumes_a_transformer_bitwise_equal_to_a_fault_free_run(launch, tmp_path):
    args = [SCRIPT, "--steps", str(STEPS), "--step-sleep-ms", "60"]
    clean = launch([*BASE, *args], name="clean")
    assert clean.wait(120) == 0, clean.output()
    reference = _final_hashes(clean)
    assert reference[0] == reference[1] and reference[0], "data-parallel ranks end with the same state"
    assert not clean.events("restore.done")

    faulted = launch([*BASE, *args], name="faulted")
    committed = faulted.wait_event(lambda e: e["kind"] == "ckpt.committed" and e["step"] >= 4, 120,
                                   "a committed snapshot of step 4 or later")["step"]
    # step indices count from 0: step.done of index `committed` is one step past the committed snapshot
    faulted.wait_event(step_done(rank=VICTIM, at_least=committed), 120, f"rank {VICTIM} past step {committed}")
    victim = worker_pids(faulted, VICTIM)[0]
    os.kill(victim, signal.SIGKILL)
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
