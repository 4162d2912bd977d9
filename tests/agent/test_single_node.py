"""One node under ``resilient-run --standalone``: completion, worker kill, hang, preemption, restart budget,
and an unmodified torchrun DDP script."""

from __future__ import annotations

import os
import signal

from resilient.testing.etcd import wait_until
from tests.agent.conftest import SCRIPTS, step_done, worker_pids

ELASTIC = str(SCRIPTS / "elastic_train.py")
PLAIN = str(SCRIPTS / "plain_ddp.py")
BASE = ["--standalone", "--nproc-per-node", "2", "--lease-ttl", "2"]


def _done(out, rank):
    return (out / f"done-{rank}").read_text().split()


def test_two_workers_run_to_completion(launch, tmp_path):
    run = launch([*BASE, PLAIN, "--steps", "3", "--out", str(tmp_path)])
    assert run.wait(120) == 0, run.output()
    assert _done(tmp_path, 0) == ["2", "0"] and _done(tmp_path, 1) == ["2", "0"]
    assert "succeeded (exit code 0)" in run.output()
    starts = run.events("worker.start")
    assert sorted(e["rank"] for e in starts) == [0, 1]


def test_worker_kill_respawns_only_that_worker_and_survivor_recovers_in_process(launch, tmp_path):
    run = launch([*BASE, ELASTIC, "--steps", "40", "--sleep", "0.05", "--out", str(tmp_path)])
    run.wait_event(step_done(rank=1, at_least=5), 120, "rank 1 at step 5")
    victim = worker_pids(run, 1)[0]
    os.kill(victim, signal.SIGKILL)
    assert run.wait(180) == 0, run.output()
    assert len(worker_pids(run, 0)) == 1, "the surviving worker must not be restarted"
    assert len(worker_pids(run, 1)) == 2, "only the killed worker is respawned"
    replacement = [e for e in run.events("worker.start") if e["rank"] == 1][1]
    standbys = [e["pid"] for e in run.events("standby.start")]
    assert replacement["how"] == "standby" and replacement["pid"] in standbys, "the warm standby took over"
    formed = [e for e in run.events("gen.formed") if "in_process" in e and e["gen"] == 2]
    assert formed and formed[0]["in_process"] == [0] and formed[0]["respawned"] == [1]
    assert any(e["rank"] == 0 for e in run.events("recover.done"))
    exits = [e for e in run.events("worker.exit") if e["signal"] == signal.SIGKILL]
    assert exits and exits[0]["pid"] == victim
    world, gen, step, digest0, _ = _done(tmp_path, 0)
    assert (world, gen, step) == ("2", "2", "39")
    assert _done(tmp_path, 1)[3] == digest0, "both ranks end with the same weights"


def test_a_replacement_dying_before_it_joins_does_not_hold_its_peers_for_the_group_timeout(launch, tmp_path):
    """Rank 1's replacement for generation 2 exits as it starts; rank 0 is already waiting for it. Rank 0
    must leave generation 2 as soon as generation 3 is announced (it sat in init_process_group for the
    whole 300 s group timeout before, and generation 3 then waited for it as long)."""
    run = launch([*BASE, ELASTIC, "--steps", "30", "--sleep", "0.05", "--out", str(tmp_path)],
                 env={"CRASH_AT_GENERATION": "2"})
    run.wait_event(step_done(rank=1, at_least=5), 120, "rank 1 at step 5")
    os.kill(worker_pids(run, 1)[0], signal.SIGKILL)
    assert run.wait(90) == 0, run.output()
    crashed = [e for e in run.events("worker.exit") if e["gen"] == 2 and e["exitcode"] == 3]
    assert crashed, "the generation-2 replacement exited as it started"
    left = [e for e in run.events("recover.begin") if e["rank"] == 0 and e["gen"] == 2]
    assert left and "superseded" in left[0]["reason"], left
    world, gen, step, digest0, _ = _done(tmp_path, 0)
    assert (world, gen, step) == ("2", "3", "29") and _done(tmp_path, 1)[3] == digest0


def test_hung_worker_is_detected_dumped_and_killed(launch, tmp_path):
    run = launch([*BASE, "--hang-timeout", "2", ELASTIC, "--steps", "30", "--sleep", "0.05", "--out", str(tmp_path)])
    run.wait_event(step_done(rank=1, at_least=3), 120, "rank 1 at step 3")
    victim = worker_pids(run, 1)[0]
    os.kill(victim, signal.SIGSTOP)
    hang = run.wait_event(lambda e: e["kind"] == "worker.hang", 60, "worker.hang")
    assert hang["rank"] == 1 and hang["beat_age"] >= 2
    assert run.wait(180) == 0, run.output()
    out = run.output()
    assert "dumping the Python stacks of hung rank 1" in out
    assert "elastic_train.py" in out and ("Current thread" in out or "Thread 0x" in out), "stacks are in the log"
    assert "hung (no progress beat)" in out


def test_a_worker_stuck_where_the_announcement_cannot_reach_is_killed_after_the_leave_timeout(launch, tmp_path):
    """Rank 0 sleeps inside step 5 (as a CUDA synchronisation on a NCCL collective whose peer is gone would)
    when rank 1 is killed: the next generation is announced, but rank 0 never leaves the old one. After the
    leave timeout the agent dumps its stacks and kills it; the job then finishes, both ranks equal."""
    run = launch([*BASE, "--leave-timeout", "2", ELASTIC, "--steps", "20", "--sleep", "0.05", "--out",
                  str(tmp_path)], env={"STALL_AT_STEP": "5"})
    wait_until(lambda: list(tmp_path.glob("stalled-*")), 120, "rank 0 asleep in step 5")
    sleeper = worker_pids(run, 0)[0]
    os.kill(worker_pids(run, 1)[0], signal.SIGKILL)
    stuck = run.wait_event(lambda e: e["kind"] == "worker.stuck", 60, "worker.stuck")
    assert stuck["rank"] == 0 and stuck["pid"] == sleeper and stuck["stuck_gen"] == 1 and stuck["waited_s"] > 2
    assert run.wait(180) == 0, run.output()
    out = run.output()
    assert "still runs generation 1" in out and "stacks of stuck rank 0" in out  # py-spy or faulthandler
    killed = [e for e in run.events("worker.exit") if e["pid"] == sleeper]
    assert killed and killed[0]["signal"] == signal.SIGKILL
    world, gen, step, digest0, _ = _done(tmp_path, 0)
    assert world == "2" and int(gen) >= 3 and step == "19"
    assert _done(tmp_path, 1)[3] == digest0, "both ranks end with the same weights"


def test_sigterm_preemption_commits_and_exits_0(launch, tmp_path):
    run = launch([*BASE, ELASTIC, "--steps", "100000", "--sleep", "0.05", "--out", str(tmp_path)])
    run.wait_event(step_done(rank=0, at_least=3), 120, "rank 0 at step 3")
    os.kill(run.proc.pid, signal.SIGTERM)
    assert run.wait(120) == 0, run.output()
    out = run.output()
    assert "preempted (SIGTERM)" in out
    commits = run.events("ckpt.committed")
    last_steps = [e["step"] for e in run.events("step.done")]
    assert commits and commits[-1]["step"] >= max(last_steps), "the final snapshot is committed"
    assert all(e["signal"] is None and e["exitcode"] == 0 for e in run.events("worker.exit")), \
        "workers finish their step and return"
    assert not run.events("fault.published")


def test_crash_before_first_step_exhausts_the_budget(launch, tmp_path):
    run = launch([*BASE, "--max-restarts", "2", ELASTIC, "--steps", "5", "--out", str(tmp_path)],
                 env={"CRASH_BEFORE_FIRST_STEP": "1"})
    assert run.wait(180) == 1, run.output()
    out = run.output()
    assert "restart" in out and "budget" in out
    assert "first failure: rank 1" in out and "exit code 5" in out
    assert len(worker_pids(run, 1)) == 3  # first start + 2 restarts, then the budget is spent


def test_unmodified_torchrun_script_survives_a_worker_kill_by_restart(launch, tmp_path):
    run = launch([*BASE, PLAIN, "--steps", "60", "--sleep", "0.05", "--out", str(tmp_path)])
    run.wait_event(lambda e: e["kind"] == "worker.exec" and e["rank"] == 1, 120, "rank 1 started")
    progress = tmp_path / "progress-1"  # the plain script emits no step events, it writes this file

    def rank1_step() -> int:
        text = progress.read_text().strip() if progress.exists() else ""
        return int(text) if text.isdigit() else -1  # "" while the script rewrites the file

    wait_until(lambda: rank1_step() >= 2, 120, "rank 1 in its training loop")
    os.kill(worker_pids(run, 1)[0], signal.SIGKILL)
    assert run.wait(180) == 0, run.output()
    assert _done(tmp_path, 0) == ["2", "1"] and _done(tmp_path, 1) == ["2", "1"]
    formed = [e for e in run.events("gen.formed") if "restarted" in e and e["gen"] == 2]
    assert formed and formed[0]["respawned"] == [1] and formed[0]["restarted"] == [0]


def test_preemption_persists_and_a_new_run_resumes_from_the_durable_tier(launch, tmp_path):
    from resilient.persist import latest_complete

    ckpt = tmp_path / "ckpt"
    out1, out2 = tmp_path / "one", tmp_path / "two"
    out1.mkdir()
    out2.mkdir()
    first = launch([*BASE, "--persist-dir", str(ckpt), ELASTIC, "--steps", "100000", "--out", str(out1)], name="one")
    first.wait_event(step_done(rank=0, at_least=4), 120, "rank 0 at step 4")
    os.kill(first.proc.pid, signal.SIGTERM)
    assert first.wait(120) == 0, first.output()
    manifest = latest_complete(str(ckpt))
    assert manifest is not None and manifest.step >= 4
    second = launch([*BASE, "--persist-dir", str(ckpt), ELASTIC, "--steps", str(manifest.step + 4), "--out",
                     str(out2)], name="two")
    assert second.wait(120) == 0, second.output()
    steps = sorted({e["step"] for e in second.events("step.done")})
    assert steps[0] == manifest.step, "the second run resumes with the steps the checkpoint had completed"
