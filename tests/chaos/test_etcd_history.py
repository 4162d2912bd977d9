"""The checks over what etcd accepted (``gen/`` records written once, fenced writes never stale, the commit
point only moving forward), the baseline's fault-free validation, and the history replay from a real etcd."""

from __future__ import annotations

import json

from resilient.chaos import calibrate, etcdlog
from resilient.chaos import invariants as inv
from resilient.chaos.etcdlog import Change
from resilient.etcd.client import EtcdKV
from resilient.keys import JobKeys
from resilient.rendezvous.model import Assignment, NodeEntry
from resilient.testing.etcd import running_etcd

from .streams import sigkill_run


def _gen(g: int, ws: int, nodes: dict[str, list[int]]) -> str:
    a = Assignment(g, ws, tuple(NodeEntry(n, "127.0.0.1", "127.0.0.1:1", "127.0.0.1:2", i, tuple(r))
                                for i, (n, r) in enumerate(nodes.items())), "127.0.0.1", 3, 0.0)
    return a.to_json().decode()


def _commit(step: int, gen: int) -> str:
    return json.dumps({"step": step, "generation": gen, "world_size": 2, "replicas": 2})


def _history() -> list[Change]:
    """The etcd side of ``sigkill_run``: generations 1 and 2, commits in each, a manifest updated later."""
    return [
        Change(10, "put", "gen/000000000001", _gen(1, 2, {"h0": [0], "h1": [1]})),
        Change(11, "put", "ckpt/000000000001/000000000016/000000", "{}"),
        Change(12, "put", "committed", _commit(16, 1)),
        Change(13, "put", "fault/000000000001/h1", "{}"),
        Change(14, "put", "gen/000000000002", _gen(2, 2, {"h0": [0], "h1": [1]})),
        Change(15, "put", "ckpt/000000000001/000000000016/000000", '{"holders": 2}'),  # update, not a creation
        Change(16, "put", "committed", _commit(20, 2)),
    ]


def test_a_clean_history_passes_every_etcd_check() -> None:
    ev = sigkill_run().events
    h = _history()
    assert inv.one_assignment(ev, h).status == inv.PASS
    assert "2 generation record(s)" in inv.one_assignment(ev, h).detail
    assert inv.no_stale_write(ev, h).status == inv.PASS
    assert inv.committed_monotonic(h).status == inv.PASS


def test_a_generation_record_written_twice_fails_one_assignment() -> None:
    h = _history() + [Change(20, "put", "gen/000000000002", _gen(2, 1, {"h0": [0]}))]
    c = inv.one_assignment(sigkill_run().events, h)
    assert c.status == inv.FAIL and "gen/2 was written 2 times" in c.detail


def test_ranks_that_do_not_partition_the_world_fail_one_assignment() -> None:
    h = [Change(10, "put", "gen/000000000001", _gen(1, 2, {"h0": [0], "h1": [0]})),
         Change(14, "put", "gen/000000000002", _gen(2, 2, {"h0": [0], "h1": [1]}))]
    c = inv.one_assignment(sigkill_run().events, h)
    assert c.status == inv.FAIL and "assigns ranks [0, 0] for world size 2" in c.detail


def test_events_disagreeing_with_the_etcd_record_fail_one_assignment() -> None:
    h = [Change(10, "put", "gen/000000000001", _gen(1, 2, {"h0": [1], "h1": [0]})),
         Change(14, "put", "gen/000000000002", _gen(2, 2, {"h0": [0], "h1": [1]}))]
    c = inv.one_assignment(sigkill_run().events, h)
    assert c.status == inv.FAIL and "node h0 ran ranks [0], etcd assigned [1]" in c.detail


def test_a_generation_missing_from_etcd_fails_one_assignment() -> None:
    h = [Change(14, "put", "gen/000000000002", _gen(2, 2, {"h0": [0], "h1": [1]}))]
    c = inv.one_assignment(sigkill_run().events, h)
    assert c.status == inv.FAIL and "no gen/1 record" in c.detail


def test_an_unreadable_history_fails_instead_of_passing_on_events_alone() -> None:
    ev = sigkill_run().events
    assert inv.one_assignment(ev, None, "etcd down").status == inv.FAIL
    assert inv.no_stale_write(ev, None, "etcd down").status == inv.FAIL
    assert inv.committed_monotonic(None, "etcd down").status == inv.FAIL


def test_a_commit_of_an_old_generation_after_a_new_one_formed_is_a_stale_write() -> None:
    h = _history() + [Change(17, "put", "committed", _commit(21, 1))]
    c = inv.no_stale_write(sigkill_run().events, h)
    assert c.status == inv.FAIL and "committed of generation 1 at revision 17" in c.detail


def test_creating_an_old_generation_manifest_late_is_a_stale_write() -> None:
    h = _history() + [Change(17, "put", "ckpt/000000000001/000000000017/000001", "{}")]
    c = inv.no_stale_write(sigkill_run().events, h)
    assert c.status == inv.FAIL and "ckpt/000000000001/000000000017/000001" in c.detail


def test_a_commit_point_moving_back_fails() -> None:
    h = _history() + [Change(17, "put", "committed", _commit(18, 2))]
    c = inv.committed_monotonic(h)
    assert c.status == inv.FAIL and "step 20 then step 18" in c.detail


def test_a_baseline_with_a_hang_or_a_second_generation_is_not_fault_free() -> None:
    ev = sigkill_run().events  # two generations, restores
    problems = calibrate.fault_free_problems(ev, {"h0": 0, "h1": 0})
    assert any("generations [1, 2]" in p for p in problems)
    assert any("restore" in p for p in problems)
    hang = ev + [{"kind": "worker.hang", "mono": 1.0, "rank": 0, "node": "h0", "beat_age": 3.1}]
    assert any("worker.hang" in p for p in calibrate.fault_free_problems(hang, {"h0": 0, "h1": 0}))
    clean = [e for e in ev if e["kind"] not in ("restore.done", "worker.exit") and e.get("gen", 1) == 1]
    assert calibrate.fault_free_problems(clean, {"h0": 0, "h1": 0}) == []
    assert calibrate.fault_free_problems(clean, {"h0": 0, "h1": 1}) == ["agents exited with {'h1': 1}"]


def test_history_replay_from_a_real_etcd_sees_every_change_in_order() -> None:
    keys = JobKeys("jobx")
    with running_etcd() as etcd:
        kv = EtcdKV.connect(etcd.settings)
        try:
            kv.put(keys.gen(1), b"one")
            kv.put(JobKeys("other").gen(1), b"not ours")
            kv.put(keys.committed, b"c1")
            kv.delete(keys.committed)
        finally:
            kv.close()
        h = etcdlog.read(etcd.settings, "jobx")
    assert [(c.type, c.key, c.value) for c in h] == [
        ("put", "gen/000000000001", "one"), ("put", "committed", "c1"), ("delete", "committed", "")]
    assert [c.rev for c in h] == sorted(c.rev for c in h)


def test_a_restore_behind_the_step_etcd_had_committed_when_its_generation_formed_fails() -> None:
    ev = [dict(e, gen=2) if e["kind"] == "restore.done" else e for e in sigkill_run().events]  # restores step 16
    ok = _history()  # step 16 committed before gen/2
    assert inv.committed_not_lost(ev, history=ok).status == inv.PASS
    ahead = ok[:4] + [Change(13, "put", "committed", _commit(17, 1))] + ok[4:]
    c = inv.committed_not_lost(ev, history=ahead)
    assert c.status == inv.FAIL and "etcd had step 17 committed when that generation formed" in c.detail


def test_a_generation_that_starts_over_behind_the_committed_step_lost_it_even_without_a_restore() -> None:
    from .streams import Stream

    s = Stream()
    s.gen(1).steps(0, 15, gen=1)  # commits up to step 16
    s.gen(2, ws=1, nodes=("h0",)).steps(0, 39, gen=2, ws=1, ranks=(0,))  # respawned from scratch
    c = inv.committed_not_lost(s.events)
    assert c.status == inv.FAIL and "generation 2 resumed at step 0 although step 16 was committed" in c.detail
    ok = Stream()
    ok.gen(1).steps(0, 15, gen=1).gen(2, ws=1, nodes=("h0",)).steps(16, 39, gen=2, ws=1, ranks=(0,))
    assert inv.committed_not_lost(ok.events).status == inv.PASS


def test_timeouts_are_raised_on_a_machine_that_pauses_longer_than_they_allow() -> None:
    from resilient.chaos import scenario as scn

    sc = scn.parse({"name": "t", "topology": {"hosts": [{"name": "h0"}]},
                    "runtime": {"lease_ttl": 2, "hang_timeout": 3}})
    calm = calibrate.Calibration(key="k", state_hash="h", final_loss=0.1, startup_s=4.0, step_s=0.05, total_s=10.0,
                                 train_s=5.0, run_dir="-", max_step_gap_s=0.2)
    same, notes = calibrate.adapt_runtime(sc, calm)
    assert (same.runtime.hang_timeout, same.runtime.lease_ttl, same.runtime.last_call) == (3.0, 2, 1.0)
    assert len(notes) == 1 and notes[0].startswith("last_call 1s")
    loaded = calibrate.Calibration(**{**calm.to_json(), "max_step_gap_s": 1.3, "start_spread_s": 2.2})
    adapted, notes = calibrate.adapt_runtime(sc, loaded)
    assert adapted.runtime.hang_timeout == 6.0 and adapted.runtime.lease_ttl == 6  # ceil(2 x 2 x 1.3)
    assert adapted.runtime.last_call == 10.0  # ceil(2 x 2 x 2.2 + 1): hosts launched together form one world
    assert len(notes) == 3 and "1.30s between steps" in notes[0]
    fixed = scn.parse({"name": "t", "topology": {"hosts": [{"name": "h0"}]}, "runtime": {"last_call": 4}})
    assert calibrate.adapt_runtime(fixed, loaded)[0].runtime.last_call == 4.0


def test_a_job_that_stops_committing_after_the_fault_fails_commits_resume() -> None:
    from resilient.chaos import metrics as M
    from resilient.chaos import scenario as scn

    sc = scn.parse({"name": "t", "topology": {"hosts": [{"name": "h0"}, {"name": "h1"}]}})
    m = M.compute(sigkill_run().events)  # commits up to step 40
    assert inv.commits_resume(sc, m, 40).status == inv.PASS
    stopped = M.compute([e for e in sigkill_run().events if not (e["kind"] == "ckpt.committed" and e["step"] > 11)])
    c = inv.commits_resume(sc, stopped, 40)
    assert c.status == inv.FAIL and "newest committed step is 11" in c.detail


def test_a_long_pause_after_a_quick_first_step_fails_progress_stall() -> None:
    from resilient.chaos import metrics as M
    from resilient.chaos import scenario as scn

    from .streams import Stream

    sc = scn.parse({"name": "t", "topology": {"hosts": [{"name": "h0"}, {"name": "h1"}]},
                    "faults": [{"id": "f", "trigger": {"step": 10}, "action": "etcd_kill"}]})
    s = Stream()
    s.gen(1).steps(0, 10, gen=1)
    s.ev("fault.fired", src="chaos", id="f", action="etcd_kill", at=s.t)
    s.steps(11, 11, gen=1).at(30.0).steps(12, 20, gen=1)  # the next step is quick, then 30 s of nothing
    checks = {c.name: c for c in inv.bounds(sc, M.compute(s.events), 10.0)}
    assert checks["recovery_time"].status == inv.PASS
    assert checks["progress_stall"].status == inv.FAIL and "30." in checks["progress_stall"].detail


def test_ranks_restoring_different_steps_in_one_generation_fail_restores_consistent() -> None:
    ev = [dict(e, gen=2) if e["kind"] == "restore.done" else e for e in sigkill_run().events]
    assert inv.restores_consistent(ev).status == inv.PASS
    mixed = [dict(e, step=12, origin="durable") if e["kind"] == "restore.done" and e["rank"] == 0 else e for e in ev]
    c = inv.restores_consistent(mixed)
    assert c.status == inv.FAIL and "rank 0 step 12 from durable" in c.detail and "rank 1 step 16 from local" in c.detail


def _late_commit_event(step: int, gen: int) -> dict:
    """A ``ckpt.committed`` event of generation ``gen`` emitted after generation 2 formed (the committing
    thread emits after its transaction returned)."""
    return {"kind": "ckpt.committed", "gen": gen, "step": step, "mono": 101.95, "node": "h1"}


def test_a_late_commit_event_is_not_stale_when_etcd_accepted_the_commit_before_the_next_generation() -> None:
    events = sigkill_run().events + [_late_commit_event(16, 1)]  # etcd: committed 16 (rev 12) < gen/2 (rev 14)
    assert inv.no_stale_write(events).status == inv.FAIL, "without etcd's order, the events alone flag it"
    c = inv.no_stale_write(events, _history())
    assert c.status == inv.PASS, c.detail


def test_a_late_commit_event_that_etcd_accepted_after_the_next_generation_is_stale() -> None:
    h = _history() + [Change(17, "put", "committed", _commit(17, 1))]
    c = inv.no_stale_write(sigkill_run().events + [_late_commit_event(17, 1)], h)
    assert c.status == inv.FAIL
    assert "step 17 committed for generation 1 after generation 2 formed" in c.detail
