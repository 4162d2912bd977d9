"""Pure pieces of the agent: the hang decision, the worker environment, the exit summary."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from resilient.agent import hang
from resilient.agent.summary import Failure, render
from resilient.agent.worker_env import AgentPaths, worker_environment
from resilient.runtime.api import WorkerAssignment

S = 1_000_000_000


def _decide(**kw):
    args = dict(now_ns=100 * S, beats=5, beat_mono_ns=90 * S, state="running", generation_handed_ns=0,
                hang_timeout=5.0, round_pending=False)
    args.update(kw)
    return hang.decide(**args)


def test_silent_worker_is_hung_after_the_timeout():
    assert _decide().hung and _decide().beat_age_s == 10.0
    assert not _decide(beat_mono_ns=96 * S).hung


def test_no_hang_before_the_first_beat_or_when_off_or_while_recovering():
    assert not _decide(beats=0).hung
    assert not _decide(hang_timeout=None).hung
    assert not _decide(state="recovering").hung
    assert not _decide(round_pending=True).hung


def test_a_new_generation_restarts_the_clock():
    assert not _decide(generation_handed_ns=98 * S).hung


@given(st.integers(0, 10**12), st.integers(0, 10**12), st.integers(0, 10**12), st.floats(0.2, 100))
def test_hung_iff_age_exceeds_timeout(now, beat, handed, timeout):
    v = _decide(now_ns=now, beat_mono_ns=beat, generation_handed_ns=handed, hang_timeout=timeout)
    assert v.hung == (max(0.0, (now - max(beat, handed)) / 1e9) > timeout)


def test_stopped_worker_is_more_suspicious_than_one_blocked_in_a_collective():
    assert hang.suspicion("T") < hang.suspicion("R") < hang.suspicion("S")


def test_worker_environment_follows_torchrun_and_adds_resilient():
    a = WorkerAssignment(generation=3, rank=5, local_rank=1, world_size=8, local_world_size=4, group_rank=1,
                         master_addr="10.0.0.1", master_port=29500, restart_count=2, job_id="j", node_id="n1")
    paths = AgentPaths(agent_socket="/s", control_file="/c", error_file="/e.json", event_log=None)
    e = worker_environment({"PATH": "/bin"}, a, group_world_size=2, max_restarts=3, snapshot_every=1, paths=paths)
    assert (e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"], e["GROUP_RANK"]) == ("5", "1", "8", "4", "1")
    assert (e["MASTER_ADDR"], e["MASTER_PORT"], e["TORCHELASTIC_RESTART_COUNT"]) == ("10.0.0.1", "29500", "2")
    assert e["TORCHELASTIC_USE_AGENT_STORE"] == "True" and e["TORCHELASTIC_ERROR_FILE"] == "/e.json"
    assert (e["RESILIENT_GENERATION"], e["RESILIENT_AGENT_SOCKET"], e["RESILIENT_JOB_ID"]) == ("3", "/s", "j")
    assert e["OMP_NUM_THREADS"] == "1" and e["PATH"] == "/bin"
    assert worker_environment({"OMP_NUM_THREADS": "4"}, a, group_world_size=2, max_restarts=3, snapshot_every=1,
                              paths=paths)["OMP_NUM_THREADS"] == "4"


def test_summary_names_the_first_failure_with_its_traceback(tmp_path):
    err = tmp_path / "error.json"
    err.write_text(json.dumps({"message": {"message": "ValueError: boom", "extraInfo": {
        "py_callstack": "Traceback (most recent call last):\n  File \"train.py\", line 3\nValueError: boom\n"}}}))
    f = Failure(rank=3, local_rank=1, node="n2", pid=42, exitcode=-9, generation=4, when=0.0, error_file=str(err))
    text = render(job="j", node="n2", exit_code=1, outcome="failed", first=f, restarts=3, generation=4,
                  committed_step=17)
    assert "rank 3 (local 1) on node n2, pid 42: signal SIGKILL" in text
    assert "ValueError: boom" in text and "committed step: 17" in text
    assert len(text.splitlines()) < 40


def test_metrics_are_served_over_http():
    import urllib.request

    from resilient.agent.metrics import AgentMetrics

    m = AgentMetrics()
    port = m.serve(0)
    try:
        m.generation.set(7)
        m.recovery.labels("rendezvous").set(0.25)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        m.close()
    assert "resilient_generation 7.0" in text
    assert 'resilient_recovery_seconds{phase="rendezvous"} 0.25' in text
