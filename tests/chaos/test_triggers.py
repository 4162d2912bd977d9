"""The trigger engine decides when each fault is due from events and the current time alone."""

from __future__ import annotations

from resilient.chaos import scenario as scn
from resilient.chaos.triggers import TriggerEngine


def _faults(*faults):
    raw = {"name": "t", "topology": {"hosts": [{"name": "h0"}, {"name": "h1"}]}, "faults": list(faults)}
    return scn.parse(raw).faults


def _step(step, t, src="h0"):
    return {"kind": "step.done", "step": step, "mono": t, "_src": src, "node": src}


def test_step_trigger_fires_at_the_first_step_at_or_past_n_on_the_named_host() -> None:
    (f,) = _faults({"id": "k", "trigger": {"step": 5, "host": "h1"}, "action": "kill_worker", "target": {"host": "h1"}})
    eng = TriggerEngine([f])
    eng.observe([_step(5, 1.0, "h0")])
    assert eng.due(1.0) == []
    eng.observe([_step(6, 1.1, "h1")])
    assert eng.due(1.1) == [f]
    eng.started("k")
    assert eng.due(2.0) == [] and eng.pending() == []


def test_delay_is_added_to_the_match_time() -> None:
    (f,) = _faults({"id": "k", "trigger": {"step": 1, "delay": 2.0}, "action": "kill_worker", "target": {"host": "h1"}})
    eng = TriggerEngine([f])
    eng.observe([_step(1, 10.0)])
    assert eng.due(11.9) == []
    assert eng.due(12.0) == [f]


def test_event_trigger_matches_kind_and_fields() -> None:
    (f,) = _faults({"id": "k", "trigger": {"event": "ckpt.committed", "where": {"step": 7}}, "action": "kill_worker",
                    "target": {"host": "h1"}})
    eng = TriggerEngine([f])
    eng.observe([{"kind": "ckpt.committed", "step": 6, "mono": 1.0}])
    assert eng.due(1.0) == []
    eng.observe([{"kind": "ckpt.committed", "step": 7, "mono": 1.5}])
    assert eng.due(1.5) == [f]


def test_time_trigger_counts_from_the_first_completed_step() -> None:
    (f,) = _faults({"id": "k", "trigger": {"time": 3}, "action": "kill_worker", "target": {"host": "h1"}})
    eng = TriggerEngine([f])
    assert eng.due(100.0) == []  # no step yet: the clock has not started
    eng.observe([_step(0, 50.0)])
    assert eng.due(52.9) == []
    assert eng.due(53.0) == [f]


def test_after_trigger_chains_on_the_fired_time_of_another_fault() -> None:
    a, b = _faults(
        {"id": "a", "trigger": {"step": 1}, "action": "kill_worker", "target": {"host": "h1"}},
        {"id": "b", "trigger": {"after": "a", "delay": 1.0}, "action": "kill_agent", "target": {"host": "h0"}},
    )
    eng = TriggerEngine([a, b])
    eng.observe([_step(1, 5.0)])
    assert eng.due(5.0) == [a]
    eng.started("a")
    assert eng.due(9.0) == []  # started but not yet fired: b waits for the evidence
    eng.fired("a", 9.0)
    assert eng.due(9.5) == []
    assert eng.due(10.0) == [b]
    assert eng.unfired() == ["b"]


def test_failpoint_trigger_matches_the_failpoint_event_of_the_target_host() -> None:
    (f,) = _faults({"id": "k", "trigger": {"failpoint": "persist.shard.after_write"}, "action": "kill_agent",
                    "target": {"host": "h1"}})
    eng = TriggerEngine([f])
    eng.observe([{"kind": "failpoint.fired", "name": "persist.shard.after_write", "mono": 1.0, "node": "h0"}])
    assert eng.due(1.0) == []
    eng.observe([{"kind": "failpoint.fired", "name": "persist.shard.after_write", "mono": 2.0, "node": "h1"}])
    assert eng.due(2.0) == [f]


def test_at_start_is_due_immediately() -> None:
    (f,) = _faults({"id": "k", "trigger": {"at": "start"}, "action": "failpoint", "target": {"host": "h1"},
                    "params": {"name": "x.y"}})
    assert TriggerEngine([f]).due(0.0) == [f]
