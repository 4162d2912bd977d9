"""Invariant checkers: pure functions over a run's event history (and, for a few, facts the runner
collected), each returning a ``Check`` with ``pass``, ``fail`` or ``n/a`` and a sentence of evidence.

| name                 | what must hold                                                                  |
|----------------------|---------------------------------------------------------------------------------|
| fault_fired          | every fault of the scenario left a ``fault.fired`` event (anti-vacuity)          |
| reaction             | the runtime visibly reacted after the first fault (the expected event kinds)     |
| committed_not_lost   | every restore resumed at or after the newest step committed before it           |
| no_step_gap          | a new generation never starts past the next step the job had reached            |
| one_assignment       | per generation one world size, disjoint ranks, one process per (gen, rank)      |
| no_stale_write       | no ``ckpt.committed`` for a generation older than one already formed            |
| restores_verified    | every ``restore.done`` says ``verified: true``                                  |
| final_state          | final state hash equal on all ranks and to the fault-free baseline              |
| outcome              | the job succeeded (or failed with the expected reason) as the scenario says     |
| bounds               | restarts, world sizes, generation change, steps recomputed, recovery time        |

A ``n/a`` never counts as a pass of something that did not happen: ``reaction`` and ``fault_fired``
fail when their evidence is missing, so a scenario whose fault silently did nothing fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from resilient.chaos import metrics as M
from resilient.chaos.eventlog import Event, host_of
from resilient.chaos.scenario import Scenario

PASS, FAIL, NA = "pass", "fail", "n/a"


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"status": self.status, "detail": self.detail}


def _of(events: Iterable[Event], kind: str) -> list[Event]:
    return [ev for ev in events if ev.get("kind") == kind]


def fault_fired(scenario: Scenario, events: list[Event]) -> Check:
    fired = {str(ev.get("id")) for ev in _of(events, "fault.fired")}
    missing = [f.id for f in scenario.faults if f.id not in fired]
    if not scenario.faults:
        return Check("fault_fired", NA, "the scenario has no faults.")
    if missing:
        return Check("fault_fired", FAIL, f"no fault.fired evidence for {missing}; the injection did not happen.")
    return Check("fault_fired", PASS, f"all {len(scenario.faults)} fault(s) fired: {sorted(fired)}.")


def reaction(kinds: Iterable[str], events: list[Event]) -> Check:
    kinds = list(dict.fromkeys(kinds))
    faults = M.fault_events(events)
    if not faults:
        return Check("reaction", FAIL if kinds else NA, "no fault fired, so no reaction can be attributed.")
    if not kinds:
        return Check("reaction", NA, "no reaction expected.")
    t = min(M.fault_time(f) for f in faults)
    after = {ev.get("kind") for ev in events if float(ev.get("mono", 0.0)) >= t}
    missing = [k for k in kinds if k not in after]
    if missing:
        return Check("reaction", FAIL, f"after the first fault no {missing} event was seen (expected {kinds}).")
    return Check("reaction", PASS, f"observed {kinds} after the first fault.")


def committed_not_lost(events: list[Event], *, allowed: bool = False) -> Check:
    restores = _of(events, "restore.done")
    if not restores:
        return Check("committed_not_lost", NA, "no restore happened.")
    bad = []
    for r in restores:
        t = float(r.get("mono", 0.0))
        committed = [c.get("step") for c in _of(events, "ckpt.committed")
                     if float(c.get("mono", 0.0)) < t and isinstance(c.get("step"), int)]
        newest = max(committed) if committed else None
        step = r.get("step")
        if newest is not None and isinstance(step, int) and step < newest:
            bad.append(f"rank {r.get('rank')} restored step {step} although step {newest} was committed")
    if bad and not allowed:
        return Check("committed_not_lost", FAIL, "; ".join(bad[:3]) + ".")
    if bad:
        return Check("committed_not_lost", PASS, "fallback to an older step, declared by the scenario: "
                     + "; ".join(bad[:2]) + ".")
    return Check("committed_not_lost", PASS, f"{len(restores)} restore(s), none behind the committed step.")


def no_step_gap(events: list[Event]) -> Check:
    steps = M.step_events(events)
    if not steps:
        return Check("no_step_gap", FAIL, "no step.done events at all: the job never made progress.")
    first_seen: dict[Any, float] = {}
    min_step: dict[Any, int] = {}
    for ev in steps:
        g = ev.get("gen")
        first_seen.setdefault(g, float(ev["mono"]))
        min_step[g] = min(min_step.get(g, ev["step"]), ev["step"])
    bad = []
    for g, t in first_seen.items():
        before = [ev["step"] for ev in steps if float(ev["mono"]) < t]
        reached = max(before) + 1 if before else 0
        if min_step[g] > reached:
            bad.append(f"generation {g} started at step {min_step[g]} but only step {reached - 1} was done")
    if bad:
        return Check("no_step_gap", FAIL, "; ".join(bad) + ".")
    return Check("no_step_gap", PASS, f"{len(first_seen)} generation(s), no step skipped.")


def one_assignment(events: list[Event]) -> Check:
    problems: list[str] = []
    sizes: dict[int, set[int]] = {}
    ranks: dict[int, dict[str, tuple[int, ...]]] = {}
    for ev in events:
        g = ev.get("gen")
        if not isinstance(g, int):
            continue
        if ev.get("kind") in ("gen.formed", "rdzv.joined") and isinstance(ev.get("world_size"), int):
            sizes.setdefault(g, set()).add(ev["world_size"])
        if ev.get("kind") == "rdzv.joined" and isinstance(ev.get("ranks"), list):
            ranks.setdefault(g, {})[str(host_of(ev))] = tuple(ev["ranks"])
    for g, s in sizes.items():
        if len(s) > 1:
            problems.append(f"generation {g} has world sizes {sorted(s)}")
    for g, by_node in ranks.items():
        flat = [r for rs in by_node.values() for r in rs]
        if len(flat) != len(set(flat)):
            problems.append(f"generation {g} gives a rank to two nodes: {by_node}")
    holders: dict[tuple[Any, Any], set[Any]] = {}
    for ev in M.step_events(events):
        if ev.get("rank") is not None:
            holders.setdefault((ev.get("gen"), ev.get("rank")), set()).add(ev.get("pid"))
    for (g, r), pids in holders.items():
        if len(pids) > 1:
            problems.append(f"generation {g} rank {r} was run by processes {sorted(pids)}")
    per_node: dict[str, list[int]] = {}
    for ev in _of(events, "rdzv.joined"):
        if isinstance(ev.get("gen"), int):
            per_node.setdefault(str(host_of(ev)), []).append(ev["gen"])
    for node, gens in per_node.items():
        if any(b <= a for a, b in zip(gens, gens[1:])):
            problems.append(f"node {node} joined generations {gens}, not strictly increasing")
    if problems:
        return Check("one_assignment", FAIL, "; ".join(problems[:4]) + ".")
    n = len(set(sizes) | {g for g, _ in holders})
    return Check("one_assignment", PASS, f"{n} generation(s), each with one assignment and one holder per rank.")


def no_stale_write(events: list[Event]) -> Check:
    newest = 0
    stale = []
    commits = 0
    for ev in sorted(events, key=lambda e: e.get("mono", 0.0)):
        g = ev.get("gen")
        if ev.get("kind") == "gen.formed" and isinstance(g, int):
            newest = max(newest, g)
        elif ev.get("kind") == "ckpt.committed" and isinstance(g, int):
            commits += 1
            if g < newest:
                stale.append(f"step {ev.get('step')} committed for generation {g} after generation {newest} formed"
                             f" (by {host_of(ev)})")
    if stale:
        return Check("no_stale_write", FAIL, "; ".join(stale[:3]) + ".")
    return Check("no_stale_write", PASS, f"{commits} commit(s), none from a superseded generation.")


def restores_verified(events: list[Event]) -> Check:
    restores = _of(events, "restore.done")
    if not restores:
        return Check("restores_verified", NA, "no restore happened.")
    bad = [r for r in restores if r.get("verified") is not True]
    if bad:
        return Check("restores_verified", FAIL, f"{len(bad)} of {len(restores)} restores not verified "
                     f"(first: rank {bad[0].get('rank')} step {bad[0].get('step')} from {bad[0].get('origin')}).")
    origins = sorted({str(r.get("origin")) for r in restores})
    return Check("restores_verified", PASS, f"{len(restores)} restore(s) verified, from {origins}.")


def final_state(scenario: Scenario, events: list[Event], baseline_hash: str | None,
                baseline_loss: float | None = None) -> Check:
    if scenario.expect.outcome == "failure":
        return Check("final_state", NA, "the job is expected to fail; no final state.")
    m = M.compute(events)
    hashes = set(m.final_hashes)
    if not hashes:
        return Check("final_state", FAIL, "no train.done event with a state hash: training did not finish.")
    if len(hashes) > 1:
        return Check("final_state", FAIL, f"ranks finished with different state hashes {sorted(hashes)}.")
    final = hashes.pop()
    if scenario.exactness == "none":
        return Check("final_state", PASS, f"all ranks agree on {final[:16]}; no comparison declared.")
    if baseline_hash is None:
        return Check("final_state", FAIL, "no fault-free baseline hash to compare with.")
    if scenario.exactness == "bitwise":
        if final == baseline_hash:
            return Check("final_state", PASS, f"bitwise equal to the fault-free run ({final[:16]}).")
        return Check("final_state", FAIL, f"state hash {final[:16]} differs from the baseline {baseline_hash[:16]}.")
    if m.final_loss is None or baseline_loss is None:
        return Check("final_state", FAIL, "approx comparison needs the final loss in train.done for both runs.")
    tol = scenario.atol + scenario.rtol * abs(baseline_loss)
    if abs(m.final_loss - baseline_loss) <= tol:
        return Check("final_state", PASS, f"final loss {m.final_loss:.6g} within {tol:.3g} of {baseline_loss:.6g}.")
    return Check("final_state", FAIL, f"final loss {m.final_loss:.6g} differs from {baseline_loss:.6g} by more "
                 f"than {tol:.3g}.")


def outcome(scenario: Scenario, events: list[Event], exit_codes: dict[str, int | None],
            logs_text: str = "") -> Check:
    done = bool(_of(events, "train.done"))
    ran = {h: c for h, c in exit_codes.items() if c is not None}
    failed = {h: c for h, c in ran.items() if c != 0}
    reasons = [str(ev.get("reason", "")) for ev in _of(events, "agent.exit") if ev.get("code") not in (0, None)]
    if scenario.expect.outcome == "success":
        if done and not [h for h, c in failed.items() if h in _surviving(scenario, events)]:
            return Check("outcome", PASS, f"training finished; agent exit codes {ran}.")
        return Check("outcome", FAIL, f"training did not finish cleanly: train.done={done}, exit codes {ran}, "
                     f"reasons {reasons[:2]}.")
    if done:
        return Check("outcome", FAIL, "training finished although the scenario expects the job to fail.")
    if not failed:
        return Check("outcome", FAIL, f"no agent exited with an error (exit codes {ran}).")
    want = scenario.expect.exit_reason
    if want and not any(want.lower() in r.lower() for r in reasons) and want.lower() not in logs_text.lower():
        return Check("outcome", FAIL, f"the job failed but no exit reason mentions {want!r} (reasons {reasons[:2]}).")
    return Check("outcome", PASS, f"the job failed as expected: exit codes {failed}, reason {reasons[:1]}.")


def _surviving(scenario: Scenario, events: list[Event]) -> set[str]:
    """Hosts whose exit code must be 0: those no fault killed."""
    hit = set()
    for ev in M.fault_events(events):
        if ev.get("action") in ("kill_agent", "host_loss", "failpoint", "pause_node", "partition") \
                and ev.get("host"):
            hit.add(str(ev["host"]))
    return {h.name for h in scenario.topology.hosts} - hit


def bounds(scenario: Scenario, m: M.RunMetrics, recovery_bound_s: float | None) -> list[Check]:
    e = scenario.expect
    out = []
    if e.restarts_min is not None or e.restarts_max is not None:
        lo = e.restarts_min if e.restarts_min is not None else 0
        hi = e.restarts_max if e.restarts_max is not None else 10**9
        ok = lo <= m.restarts <= hi
        out.append(Check("restarts", PASS if ok else FAIL,
                         f"{m.restarts} generation change(s), expected {lo}..{hi if hi < 10**9 else 'any'}."))
    if e.generation_change is not None:
        changed = m.restarts > 0
        ok = changed == e.generation_change
        out.append(Check("generation_change", PASS if ok else FAIL,
                         f"generations {m.generations}; a change was {'expected' if e.generation_change else 'not allowed'}."))
    if e.world_sizes is not None:
        ok = tuple(m.world_sizes) == tuple(e.world_sizes)
        out.append(Check("world_sizes", PASS if ok else FAIL, f"world sizes {m.world_sizes}, expected {list(e.world_sizes)}."))
    if e.final_world_size is not None:
        last = m.world_sizes[-1] if m.world_sizes else None
        out.append(Check("final_world_size", PASS if last == e.final_world_size else FAIL,
                         f"final world size {last}, expected {e.final_world_size}."))
    if e.max_steps_recomputed is not None:
        ok = m.steps_recomputed <= e.max_steps_recomputed
        out.append(Check("steps_recomputed", PASS if ok else FAIL,
                         f"{m.steps_recomputed} step(s) recomputed, bound {e.max_steps_recomputed}."))
    if scenario.expect.outcome == "success" and m.faults and recovery_bound_s is not None:
        worst = [f.recovery_s for f in m.faults]
        if any(r is None for r in worst):
            out.append(Check("recovery_time", FAIL, "a fault was never followed by new progress."))
        else:
            obs = max(worst)  # type: ignore[type-var]
            out.append(Check("recovery_time", PASS if obs <= recovery_bound_s else FAIL,
                             f"slowest recovery {obs:.2f}s, bound {recovery_bound_s:.2f}s."))
    return out


def leftovers(census: dict[str, list[str]]) -> Check:
    left = {k: v for k, v in census.items() if v}
    if left:
        return Check("no_leftovers", FAIL, "left behind by the runtime after the job ended: "
                     + "; ".join(f"{k}: {v[:5]}" for k, v in left.items()) + ".")
    return Check("no_leftovers", PASS, "no process, segment, lease, namespace or rule left behind.")


def verdict(checks: Iterable[Check]) -> str:
    return "fail" if any(c.status == FAIL for c in checks) else "pass"
