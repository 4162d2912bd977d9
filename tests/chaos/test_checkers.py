"""Metrics and invariant checkers on recorded-shape event streams: each checker passes on a correct
history and fails, naming the evidence, on a history that breaks its invariant."""

from __future__ import annotations

import copy

import pytest

from resilient.chaos import invariants as inv
from resilient.chaos import metrics as M
from resilient.chaos import scenario as scn
from resilient.chaos.eventlog import EventTail, read_dir, write

from .streams import Stream, sigkill_run


def _scenario(**expect):
    return scn.parse({
        "name": "t", "topology": {"hosts": [{"name": "h0"}, {"name": "h1"}]},
        "faults": [{"id": "kill-w1", "trigger": {"step": 15}, "action": "kill_worker", "target": {"host": "h1"}}],
        "expect": expect,
    })


def test_metrics_of_a_sigkill_run() -> None:
    s = sigkill_run()
    m = M.compute(s.events, baseline_train_s=2.0)
    (f,) = m.faults
    assert f.last_step_before == 15
    assert f.detection_s == pytest.approx(0.05, abs=0.01)  # worker.exit
    assert f.recovery_s == pytest.approx(0.35, abs=0.02)  # first step.done of step 16
    assert m.restarts == 1 and m.generations == [1, 2] and m.world_sizes == [2]
    assert m.steps_unique == 40 and m.steps_recomputed == 0
    assert m.goodput == pytest.approx(2.0 / m.train_s)
    assert m.final_hashes == ["abc", "abc"]


def test_recomputed_steps_count_every_generation_that_redid_a_step() -> None:
    s = Stream()
    s.gen(1).steps(0, 10, gen=1).gen(2).steps(8, 12, gen=2)
    assert M.compute(s.events).steps_recomputed == 3  # 8, 9, 10 done twice


def test_duplicate_step_events_from_two_layers_count_once() -> None:
    s = Stream()
    s.gen(1).steps(0, 3, gen=1)
    dup = [copy.deepcopy(e) for e in s.events if e["kind"] == "step.done"]
    assert M.compute(s.events + dup).steps_recomputed == 0


def test_all_checks_pass_on_a_correct_history() -> None:
    s = sigkill_run()
    sc = _scenario(restarts=1, world_sizes=[2], max_steps_recomputed=0)
    checks = [inv.fault_fired(sc, s.events), inv.reaction(["worker.exit", "gen.formed"], s.events),
              inv.committed_not_lost(s.events), inv.no_step_gap(s.events), inv.one_assignment(s.events),
              inv.no_stale_write(s.events), inv.restores_verified(s.events),
              inv.final_state(sc, s.events, "abc"), inv.outcome(sc, s.events, {"h0": 0, "h1": 0}),
              *inv.bounds(sc, M.compute(s.events), 5.0)]
    assert [c.name for c in checks if c.status != inv.PASS] == []
    assert inv.verdict(checks) == "pass"


def test_a_fault_without_evidence_fails_instead_of_passing_vacuously() -> None:
    s = sigkill_run()
    events = [e for e in s.events if e["kind"] != "fault.fired"]
    assert inv.fault_fired(_scenario(), events).status == inv.FAIL
    assert inv.reaction(["worker.exit"], events).status == inv.FAIL


def test_missing_reaction_fails() -> None:
    s = sigkill_run()
    c = inv.reaction(["worker.hang"], s.events)
    assert c.status == inv.FAIL and "worker.hang" in c.detail


def test_restore_behind_the_committed_step_is_a_lost_commit() -> None:
    s = sigkill_run()
    for e in s.events:
        if e["kind"] == "restore.done" and e["rank"] == 1:
            e["step"] = 14
    c = inv.committed_not_lost(s.events)
    assert c.status == inv.FAIL and "restored step 14 although step 16 was committed" in c.detail
    assert inv.committed_not_lost(s.events, allowed=True).status == inv.PASS


def test_generation_starting_past_the_reached_step_is_a_gap() -> None:
    s = Stream()
    s.gen(1).steps(0, 5, gen=1).gen(2).steps(8, 9, gen=2)
    c = inv.no_step_gap(s.events)
    assert c.status == inv.FAIL and "generation 2 started at step 8" in c.detail


def test_two_processes_holding_one_rank_in_one_generation_is_split_brain() -> None:
    s = Stream()
    s.gen(1).steps(0, 2, gen=1)
    s.ev("step.done", src="h1", step=2, gen=1, world_size=2, rank=1, pid=999)
    c = inv.one_assignment(s.events)
    assert c.status == inv.FAIL and "rank 1 was run by processes" in c.detail


def test_conflicting_world_sizes_or_ranks_in_one_generation_fail() -> None:
    s = Stream()
    s.ev("gen.formed", gen=1, world_size=2)
    s.ev("rdzv.joined", src="h0", gen=1, world_size=2, ranks=[0])
    s.ev("rdzv.joined", src="h1", gen=1, world_size=3, ranks=[0])
    c = inv.one_assignment(s.events)
    assert c.status == inv.FAIL and "world sizes [2, 3]" in c.detail and "two nodes" in c.detail


def test_commit_from_a_superseded_generation_is_a_stale_write() -> None:
    s = Stream()
    s.gen(1).steps(0, 3, gen=1).gen(2)
    s.ev("ckpt.committed", src="h1", step=4, gen=1)
    c = inv.no_stale_write(s.events)
    assert c.status == inv.FAIL and "generation 1 after generation 2" in c.detail


def test_unverified_restore_fails() -> None:
    s = sigkill_run()
    next(e for e in s.events if e["kind"] == "restore.done")["verified"] = False
    assert inv.restores_verified(s.events).status == inv.FAIL


def test_final_state_bitwise_and_approx() -> None:
    s = sigkill_run(hash_="abc")
    sc = _scenario()
    assert inv.final_state(sc, s.events, "abd").status == inv.FAIL
    assert inv.final_state(sc, s.events, None).status == inv.FAIL
    approx = scn.parse({**{"name": "t", "topology": {"hosts": [{"name": "h0"}]}},
                        "exactness": {"approx": {"rtol": 1e-3, "atol": 0}}})
    assert inv.final_state(approx, s.events, "zzz", baseline_loss=0.5002).status == inv.PASS
    assert inv.final_state(approx, s.events, "zzz", baseline_loss=0.6).status == inv.FAIL
    split = sigkill_run()
    next(e for e in split.events if e["kind"] == "train.done")["state_hash"] = "other"
    assert "different state hashes" in inv.final_state(sc, split.events, "abc").detail


def test_expected_failure_needs_an_error_exit_with_the_named_reason() -> None:
    sc = _scenario(outcome="failure", exit_reason="restart budget")
    s = Stream()
    s.gen(1).steps(0, 3, gen=1)
    s.ev("agent.exit", src="h0", code=1, reason="restart budget spent; last failure: worker.exit")
    assert inv.outcome(sc, s.events, {"h0": 1, "h1": 1}).status == inv.PASS
    wrong = Stream()
    wrong.ev("agent.exit", src="h0", code=1, reason="etcd unreachable")
    assert inv.outcome(sc, wrong.events, {"h0": 1}).status == inv.FAIL
    assert inv.outcome(sc, sigkill_run().events, {"h0": 0, "h1": 0}).status == inv.FAIL


def test_bounds_report_restarts_world_sizes_and_recovery() -> None:
    s = sigkill_run()
    sc = _scenario(restarts=0, world_sizes=[2, 1], generation_change=False, max_steps_recomputed=0)
    by = {c.name: c for c in inv.bounds(sc, M.compute(s.events), recovery_bound_s=0.1)}
    assert by["restarts"].status == inv.FAIL
    assert by["world_sizes"].status == inv.FAIL
    assert by["generation_change"].status == inv.FAIL
    assert by["steps_recomputed"].status == inv.PASS
    assert by["recovery_time"].status == inv.FAIL and "bound 0.10s" in by["recovery_time"].detail


def test_leftovers_fail_and_name_what_was_left() -> None:
    assert inv.leftovers({"processes": [], "shm_segments": []}).status == inv.PASS
    c = inv.leftovers({"processes": ["123"], "shm_segments": ["resilient-x"]})
    assert c.status == inv.FAIL and "resilient-x" in c.detail


def test_event_files_round_trip_and_tail_skips_torn_lines(tmp_path) -> None:
    s = sigkill_run()
    write(tmp_path / "h0.jsonl", s.events[:10])
    tail = EventTail(tmp_path)
    assert len(tail.poll()) == 10
    with open(tmp_path / "h0.jsonl", "a") as fh:
        fh.write('{"kind": "step.done", "mono": 1')  # a writer is mid-line
    assert tail.poll() == []
    with open(tmp_path / "h0.jsonl", "a") as fh:
        fh.write(', "step": 3}\n')
    (got,) = tail.poll()
    assert got["step"] == 3 and got["_src"] == "h0"
    assert len(read_dir(tmp_path)) == 11


def test_where_values_ending_in_star_match_as_prefix() -> None:
    from resilient.chaos.eventlog import fields_match

    ev = {"kind": "restore.done", "origin": "peer:h1", "step": 5}
    assert fields_match(ev, {"origin": "peer:*", "step": 5})
    assert not fields_match(ev, {"origin": "local*"})
    assert not fields_match(ev, {"origin": "peer"})


def test_a_survivors_in_flight_step_is_not_counted_as_recovery() -> None:
    s = Stream()
    s.gen(1).steps(0, 5, gen=1)
    s.ev("fault.fired", src="chaos", id="k", action="kill_worker", at=s.t)
    s.at(0.01)
    s.ev("step.done", src="h0", step=6, gen=1, world_size=2, rank=0)  # in flight when the fault hit
    s.at(1.0)
    s.gen(2)
    s.at(0.5)
    s.steps(6, 7, gen=2)
    (f,) = M.compute(s.events).faults
    assert f.recovery_s == pytest.approx(1.51, abs=0.02)
