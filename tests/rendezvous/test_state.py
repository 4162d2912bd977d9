"""Pure rendezvous logic: assignment planning, the closing node's decisions, member triggers, the restart
budget, the data model and settings. Time is a plain number here."""

from __future__ import annotations

import pytest

from resilient.config import Timeouts
from resilient.errors import ConfigError, RestartBudgetExceededError
from resilient.etcd.api import WatchEvent
from resilient.keys import JobKeys
from resilient.rendezvous import budget
from resilient.rendezvous.model import Assignment, NodeInfo
from resilient.rendezvous.settings import RendezvousSettings
from resilient.rendezvous.state import (
    Close,
    ClosingRound,
    NodeDown,
    Wait,
    Waiting,
    WaitingGone,
    member_failed,
    member_trigger,
    plan_assignment,
)

KEYS = JobKeys("job")


def info(name: str, slots: int = 2) -> NodeInfo:
    i = int(name.lstrip("n"))
    return NodeInfo(name, f"host{i}", f"10.0.0.{i}:2940", f"10.0.0.{i}:2941", slots, 29500 + i)


def cands(*names: str, slots: int = 2) -> dict[str, NodeInfo]:
    return {n: info(n, slots) for n in names}


def check_contiguous(a: Assignment) -> None:
    all_ranks = sorted(r for e in a.nodes for r in e.ranks)
    assert all_ranks == list(range(a.world_size))
    assert sorted(e.group_rank for e in a.nodes) == list(range(len(a.nodes)))


# --- plan_assignment ---------------------------------------------------------------------------------------
def test_first_generation_orders_nodes_by_id_with_contiguous_ranks():
    a = plan_assignment(1, cands("n2", "n0", "n1"), None, 8, 100.0)
    assert [e.node_id for e in a.nodes] == ["n0", "n1", "n2"]
    assert a.ranks_of("n0") == (0, 1) and a.ranks_of("n2") == (4, 5)
    assert a.world_size == 6 and a.master_addr == "host0" and a.master_port == 29500
    check_contiguous(a)


def test_survivors_keep_ranks_and_newcomer_fills_the_gap():
    g1 = plan_assignment(1, cands("n0", "n1", "n2"), None, 8, 0.0)
    # n1 is lost, n3 arrives: world stays 6, n3 takes n1's old ranks, survivors untouched
    g2 = plan_assignment(2, cands("n0", "n2", "n3"), g1, 8, 1.0)
    assert g2.ranks_of("n0") == (0, 1) and g2.ranks_of("n2") == (4, 5)
    assert g2.ranks_of("n3") == (2, 3)
    assert g2.entry("n2").group_rank == 2 and g2.entry("n3").group_rank == 1
    check_contiguous(g2)


def test_shrink_compacts_ranks_beyond_the_new_world_deterministically():
    g1 = plan_assignment(1, cands("n0", "n1", "n2"), None, 8, 0.0)
    g2 = plan_assignment(2, cands("n1", "n2"), g1, 8, 1.0)  # n0 lost: world 4
    assert g2.ranks_of("n1") == (2, 3)  # kept: still < 4
    assert g2.ranks_of("n2") == (0, 1)  # 4,5 no longer fit: compacted into the free low ranks
    assert g2.entry("n1").group_rank == 1 and g2.entry("n2").group_rank == 0
    assert g2.master_addr == "host2"
    check_contiguous(g2)
    assert plan_assignment(2, cands("n1", "n2"), g1, 8, 1.0) == g2


def test_max_prefers_previous_members_over_newcomers():
    g1 = plan_assignment(1, cands("n5", "n6"), None, 2, 0.0)
    g2 = plan_assignment(2, cands("n0", "n5", "n6"), g1, 2, 1.0)
    assert g2.node_ids == ("n5", "n6")


def test_a_node_with_other_slot_count_gets_fresh_ranks():
    g1 = plan_assignment(1, cands("n0", "n1"), None, 8, 0.0)
    c = cands("n0", "n1")
    c["n0"] = info("n0", slots=1)
    g2 = plan_assignment(2, c, g1, 8, 1.0)
    assert g2.world_size == 3 and g2.ranks_of("n0") == (0,) and g2.ranks_of("n1") == (1, 2)
    check_contiguous(g2)


def test_assignment_json_round_trip_keeps_non_contiguous_ranks():
    a = plan_assignment(3, cands("n0", "n1"), None, 8, 12.5)
    odd = Assignment(a.generation, a.world_size, (a.nodes[0].__class__("n9", "h", "h:1", "h:2", 0, (3, 0)),), "h", 1, 2.0)
    assert Assignment.from_json(a.to_json()) == a
    assert Assignment.from_json(odd.to_json()) == odd


def test_node_info_is_validated():
    with pytest.raises(ConfigError, match="slots=0"):
        NodeInfo("n0", "h", "h:1", "h:2", 0, 1)
    with pytest.raises(ConfigError, match="not host:port"):
        NodeInfo("n0", "h", "h", "h:2", 1, 1)
    assert NodeInfo.from_json(info("n3").to_json()) == info("n3")


# --- ClosingRound --------------------------------------------------------------------------------------------
def rnd(now=0.0, previous=None, formed_rev=0, alive=(), waiting=(), min_nodes=2, max_nodes=4, last_call=1.0, grace=5.0):
    return ClosingRound.start(
        now, min_nodes=min_nodes, max_nodes=max_nodes, last_call=last_call, rejoin_grace=grace,
        previous=previous, formed_rev=formed_rev, alive=alive, waiting=waiting,
    )


def w(name: str, rev: int) -> Waiting:
    return Waiting(info(name), rev)


def test_round_waits_for_min_then_a_last_call_window():
    r = rnd(waiting=[w("n0", 5)], alive=["n0"])
    assert r.decide(0.0) == Wait(None, 1)
    r.apply(2.0, w("n1", 6))
    assert r.decide(2.5) == Wait(3.0, 2)
    r.apply(2.7, w("n2", 7))
    d = r.decide(3.0)
    assert isinstance(d, Close) and d.reason == "last-call" and set(d.candidates) == {"n0", "n1", "n2"}
    assert d.revisions == {"n0": 5, "n1": 6, "n2": 7}


def test_round_closes_at_once_at_max():
    r = rnd(waiting=[w("n0", 5), w("n1", 6)], max_nodes=3)
    assert isinstance(r.decide(0.0), Wait)
    r.apply(0.1, w("n2", 7))
    d = r.decide(0.1)
    assert isinstance(d, Close) and d.reason == "max"


def test_dropping_below_min_resets_the_last_call():
    r = rnd(waiting=[w("n0", 5), w("n1", 6)])
    r.apply(0.5, WaitingGone("n1"))
    assert r.decide(5.0) == Wait(None, 1)
    r.apply(6.0, w("n1", 9))
    assert r.decide(6.5) == Wait(7.0, 2)


def test_fast_path_when_every_live_member_is_back():
    g1 = plan_assignment(1, cands("n0", "n1", "n2"), None, 8, 0.0)
    r = rnd(previous=g1, formed_rev=10, alive=["n0", "n1"], waiting=[w("n0", 11)])
    assert r.missing_members() == ["n1"]
    assert isinstance(r.decide(0.0), Wait)
    r.apply(0.01, w("n1", 12))
    d = r.decide(0.01)  # n2 is dead (no node key): no reason to wait for it
    assert isinstance(d, Close) and d.reason == "all-members-back" and set(d.candidates) == {"n0", "n1"}


def test_waiting_keys_older_than_the_last_generation_do_not_count():
    g1 = plan_assignment(1, cands("n0", "n1"), None, 8, 0.0)
    r = rnd(previous=g1, formed_rev=10, alive=["n0", "n1", "n5"], waiting=[w("n0", 11), w("n5", 3)])
    assert set(r.waiting) == {"n0"}


def test_live_members_get_a_grace_period_before_the_round_closes_without_them():
    g1 = plan_assignment(1, cands("n0", "n1", "n2"), None, 8, 0.0)
    r = rnd(previous=g1, formed_rev=10, alive=["n0", "n1", "n2", "n3"], waiting=[w("n3", 11), w("n0", 12)],
            last_call=1.0, grace=5.0)
    assert r.decide(1.5) == Wait(5.0, 2)  # n1, n2 alive but not back yet
    d = r.decide(5.0)
    assert isinstance(d, Close) and d.reason == "last-call"


def test_a_lost_node_leaves_the_round():
    r = rnd(waiting=[w("n0", 5), w("n1", 6)], alive=["n0", "n1"])
    r.apply(0.2, NodeDown("n1"))
    assert set(r.waiting) == {"n0"} and r.min_reached_at is None


# --- member_trigger ------------------------------------------------------------------------------------------
G1 = plan_assignment(4, cands("n0", "n1"), None, 8, 0.0)


def ev(kind: str, key: str, value: bytes = b"x", rev: int = 50) -> WatchEvent:
    return WatchEvent(kind, key, value, rev)


@pytest.mark.parametrize(
    "event,max_nodes,reason",
    [
        (ev("delete", KEYS.node("n1")), 8, "node-lost:n1"),
        (ev("delete", KEYS.node("n7")), 8, None),
        (ev("put", KEYS.node("n1")), 8, None),
        (ev("put", KEYS.fault(4, "n0")), 8, "fault:n0"),
        (ev("put", KEYS.fault(3, "n0")), 8, None),
        (ev("put", KEYS.waiting("n7")), 8, "join:n7"),
        (ev("put", KEYS.waiting("n7")), 2, None),  # at MAX a newcomer waits as a spare
        (ev("put", KEYS.waiting("n1")), 2, "join:n1"),
        (ev("delete", KEYS.waiting("n7")), 8, None),
        (ev("put", KEYS.gen(5)), 8, "superseded:5"),
        (ev("put", KEYS.gen(4)), 8, None),
        (ev("put", KEYS.closed), 8, "closed"),
        (ev("put", KEYS.progress("n0")), 8, None),
    ],
)
def test_member_trigger(event, max_nodes, reason):
    assert member_trigger(KEYS, G1, max_nodes, event) == reason


@pytest.mark.parametrize(
    "event,failed",
    [
        (ev("delete", KEYS.node("n1")), True),  # a member's node is gone
        (ev("put", KEYS.fault(4, "n0")), True),  # a member reported a fault
        (ev("put", KEYS.waiting("n7")), False),  # a node joins: the generation's snapshots may still commit
        (ev("put", KEYS.gen(5)), False),
        (ev("put", KEYS.closed), False),
    ],
)
def test_member_failed_tells_the_reasons_that_end_a_generation_by_a_failure(event, failed):
    assert member_failed(member_trigger(KEYS, G1, 8, event)) is failed


# --- budget --------------------------------------------------------------------------------------------------
def test_budget_charges_once_per_generation_and_stops_at_max():
    r0 = budget.BudgetRecord()
    r1, changed = budget.charge(r0, 1, "fault:n0", 10.0, 2, None)
    assert changed and r1.total == 1
    r1b, changed = budget.charge(r1, 1, "fault:n1", 10.5, 2, None)
    assert not changed and r1b == r1
    r2, _ = budget.charge(r1, 2, "node-lost:n1", 11.0, 2, None)
    with pytest.raises(RestartBudgetExceededError, match="max_restarts=2"):
        budget.charge(r2, 3, "fault:n0", 12.0, 2, None)
    assert budget.BudgetRecord.from_json(r2.to_json()) == r2


def test_budget_window_forgets_old_restarts():
    r, _ = budget.charge(budget.BudgetRecord(), 1, "a", 0.0, 1, 60.0)
    with pytest.raises(RestartBudgetExceededError, match="last 60 s"):
        budget.charge(r, 2, "b", 30.0, 1, 60.0)
    r2, changed = budget.charge(r, 2, "b", 61.0, 1, 60.0)
    assert changed and r2.total == 2 and budget.counted(r2, 61.0, 60.0) == 1


def test_zero_restarts_allowed_refuses_the_first():
    with pytest.raises(RestartBudgetExceededError):
        budget.charge(budget.BudgetRecord(), 1, "a", 0.0, 0, None)


# --- settings ------------------------------------------------------------------------------------------------
def test_settings_are_validated_with_the_values_named():
    with pytest.raises(ConfigError, match="MIN must not exceed MAX"):
        RendezvousSettings(3, 2)
    with pytest.raises(ConfigError, match="join_timeout=1s must exceed last_call=2s"):
        RendezvousSettings(1, 2, last_call=2.0, join_timeout=1.0)
    with pytest.raises(ConfigError, match="restart_window"):
        RendezvousSettings(1, 2, restart_window=0)
    from resilient.config import NodeRange

    s = RendezvousSettings.from_timeouts(NodeRange(1, 4), Timeouts.from_lease_ttl(2, last_call=0.3, join_timeout=9))
    assert (s.min_nodes, s.max_nodes, s.last_call, s.join_timeout) == (1, 4, 0.3, 9)
