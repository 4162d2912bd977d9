"""Invariant checkers: pure functions over a run's event history (and, for a few, facts the runner
collected), each returning a ``Check`` with ``pass``, ``fail`` or ``n/a`` and a sentence of evidence.

| name                 | what must hold                                                                  |
|----------------------|---------------------------------------------------------------------------------|
| fault_fired          | every fault of the scenario left a ``fault.fired`` event (anti-vacuity)          |
| reaction             | the runtime visibly reacted after the first fault (the expected event kinds)     |
| committed_not_lost   | every restore resumed at or after the newest step committed before it           |
| no_step_gap          | a new generation never starts past the next step the job had reached            |
| one_assignment       | per generation one world size, disjoint ranks, one process per (gen, rank); in  |
|                      | etcd each ``gen/<g>`` written once, ranks complete, and agreeing with the events |
| no_stale_write       | no ``ckpt.committed`` for a superseded generation; in etcd no fenced write      |
|                      | (commit, manifest, fault) of generation g accepted after a newer g' was created |
| committed_monotonic  | the ``committed`` record in etcd never moved back to an older step               |
| restores_verified    | every ``restore.done`` says ``verified: true``                                  |
| restores_consistent  | all ranks restoring in one generation restore the same step                     |
| durable_consistent   | every durable checkpoint visible after the run (manifest committed) verifies     |
| final_state          | final state hash equal on all ranks and to the fault-free baseline              |
| outcome              | the job succeeded (or failed with the expected reason) as the scenario says     |
| commits_resume       | a successful job ends with the fault-free run's newest committed step           |
| bounds               | restarts, world sizes, generation change, steps recomputed, recovery time, the  |
|                      | longest pause without a step (progress_stall)                                   |

A ``n/a`` never counts as a pass of something that did not happen: ``reaction`` and ``fault_fired``
fail when their evidence is missing, so a scenario whose fault silently did nothing fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import json

from resilient.chaos import metrics as M
from resilient.chaos.etcdlog import Change
from resilient.chaos.eventlog import Event, host_of
from resilient.chaos.scenario import Scenario

PASS, FAIL, NA = "pass", "fail", "n/a"
COMMIT_LAG_STEPS = 5  # how far behind the fault-free run's last commit a job may end (commits trail steps)


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


def committed_at_generation(history: list[Change]) -> dict[int, int]:
    """For each generation g in etcd: the committed step in force when ``gen/<g>`` was created (revision
    order, so no clock is involved); generations formed before any commit are absent."""
    out: dict[int, int] = {}
    committed: int | None = None
    for c in history:
        if c.key == "committed" and c.type == "put":
            try:
                committed = int(json.loads(c.value)["step"])
            except (ValueError, KeyError, TypeError):
                continue
        elif c.key.startswith("gen/") and c.type == "put" and committed is not None:
            g = _gen_of_key(c.key)
            if g is not None:
                out.setdefault(g, committed)
    return out


def committed_not_lost(events: list[Event], *, allowed: bool = False, history: list[Change] | None = None) -> Check:
    restores = _of(events, "restore.done")
    bad = []
    at_gen = committed_at_generation(history) if history is not None else {}
    # A generation that resumes behind the committed step lost it, whether or not it restored anything (a
    # respawned worker that silently starts from scratch is the worst case).
    first_step: dict[int, int] = {}
    formed_t: dict[int, float] = {}
    for ev in events:
        g = ev.get("gen")
        if not isinstance(g, int):
            continue
        if ev.get("kind") in ("gen.formed", "rdzv.joined", "step.done"):
            formed_t[g] = min(formed_t.get(g, float("inf")), float(ev.get("mono", 0.0)))
        if ev.get("kind") == "step.done" and isinstance(ev.get("step"), int):
            first_step[g] = min(first_step.get(g, ev["step"]), ev["step"])
    commits = [(float(c.get("mono", 0.0)), c["step"]) for c in _of(events, "ckpt.committed")
               if isinstance(c.get("step"), int)]
    for g, first in sorted(first_step.items()):
        by_events = max((st for t, st in commits if t < formed_t[g]), default=None)
        committed = max(x for x in (by_events, at_gen.get(g)) if x is not None) \
            if by_events is not None or g in at_gen else None
        if committed is not None and first < committed:
            bad.append(f"generation {g} resumed at step {first} although step {committed} was committed when it "
                       f"formed")
    if not restores and not bad:
        return Check("committed_not_lost", NA if len(first_step) <= 1 else PASS,
                     "no restore happened" + (f"; {len(first_step)} generations, none resumed behind the "
                                              "committed step." if len(first_step) > 1 else "."))
    for r in restores:
        t = float(r.get("mono", 0.0))
        committed = [c.get("step") for c in _of(events, "ckpt.committed")
                     if float(c.get("mono", 0.0)) < t and isinstance(c.get("step"), int)]
        newest = max(committed) if committed else None
        step = r.get("step")
        if newest is not None and isinstance(step, int) and step < newest:
            bad.append(f"rank {r.get('rank')} restored step {step} although step {newest} was committed")
        elif isinstance(r.get("gen"), int) and r["gen"] in at_gen and isinstance(step, int) \
                and step < at_gen[r["gen"]]:
            bad.append(f"rank {r.get('rank')} restored step {step} in generation {r['gen']} although etcd had "
                       f"step {at_gen[r['gen']]} committed when that generation formed")
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


def one_assignment(events: list[Event], history: list[Change] | None = None,
                   history_error: str | None = None) -> Check:
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
    if history_error is not None:
        problems.append(f"the etcd record of generations could not be read ({history_error})")
    etcd_note = ""
    if history is not None:
        records, etcd_problems = etcd_generations(history)
        problems += etcd_problems
        for g, ws in sorted(sizes.items()):
            rec = records.get(g)
            if rec is None:
                problems.append(f"generation {g} appears in the events but etcd has no gen/{g} record")
            elif ws and ws != {rec["w"]}:
                problems.append(f"generation {g}: events say world size {sorted(ws)}, etcd says {rec['w']}")
        for g, by_node in ranks.items():
            rec = records.get(g)
            for node, rs in by_node.items():
                if rec is not None and node in rec["nodes"] and tuple(rec["nodes"][node]) != rs:
                    problems.append(f"generation {g}: node {node} ran ranks {list(rs)}, etcd assigned "
                                    f"{rec['nodes'][node]}")
        for (g, r), pids in holders.items():
            rec = records.get(g) if isinstance(g, int) else None
            if rec is not None and isinstance(r, int) and not 0 <= r < rec["w"]:
                problems.append(f"generation {g}: rank {r} stepped although etcd's world size is {rec['w']}")
        etcd_note = f"; etcd holds {len(records)} generation record(s), each written once"
    if problems:
        return Check("one_assignment", FAIL, "; ".join(problems[:4]) + ".")
    n = len(set(sizes) | {g for g, _ in holders})
    return Check("one_assignment", PASS,
                 f"{n} generation(s), each with one assignment and one holder per rank{etcd_note}.")


def _gen_of_key(key: str) -> int | None:
    parts = key.split("/")
    if len(parts) >= 2 and parts[1].isdigit():
        return int(parts[1])
    return None


def etcd_generations(history: list[Change]) -> tuple[dict[int, dict[str, Any]], list[str]]:
    """Decode every ``gen/<g>`` record of the history; problems: rewritten, deleted, malformed, gaps,
    ranks not a partition of ``0..w-1``."""
    records: dict[int, dict[str, Any]] = {}
    problems: list[str] = []
    puts: dict[int, int] = {}
    for c in history:
        if not c.key.startswith("gen/"):
            continue
        g = _gen_of_key(c.key)
        if g is None:
            continue
        if c.type == "delete":
            problems.append(f"gen/{g} was deleted at revision {c.rev}")
            continue
        puts[g] = puts.get(g, 0) + 1
        if puts[g] > 1:
            problems.append(f"gen/{g} was written {puts[g]} times (again at revision {c.rev})")
            continue
        try:
            d = json.loads(c.value)
            nodes = {str(n[0]): _ranks(n[5]) for n in d["n"]}
            records[g] = {"w": int(d["w"]), "nodes": nodes, "rev": c.rev}
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            problems.append(f"gen/{g} holds a malformed record ({exc})")
            continue
        flat = [r for rs in nodes.values() for r in rs]
        if sorted(flat) != list(range(int(d["w"]))):
            problems.append(f"gen/{g} assigns ranks {sorted(flat)} for world size {d['w']}")
    if records:
        want = list(range(1, max(records) + 1))
        missing = [g for g in want if g not in records]
        if missing:
            problems.append(f"etcd has no record for generation(s) {missing[:5]}")
    return records, problems


def _ranks(raw: Any) -> list[int]:
    if isinstance(raw, dict):
        return [int(r) for r in raw["r"]]
    start, count = raw
    return list(range(int(start), int(start) + int(count)))


def etcd_stale_writes(history: list[Change]) -> tuple[list[str], int, set[tuple[int, int]]]:
    """Fenced writes of a generation older than one already created in etcd at that revision: a
    ``committed`` record naming generation g, or the creation of ``ckpt/<g>/...`` or ``fault/<g>/...``.
    Returns (problems, number of fenced writes seen, (generation, step) of every commit etcd accepted
    while its generation was still the newest)."""
    newest = 0
    stale: list[str] = []
    seen = 0
    in_time: set[tuple[int, int]] = set()
    live: set[str] = set()
    for c in history:
        if c.type != "put":
            live.discard(c.key)
            continue
        created = c.key not in live
        live.add(c.key)
        if c.key.startswith("gen/"):
            g = _gen_of_key(c.key)
            if g is not None:
                newest = max(newest, g)
            continue
        g = None
        if c.key == "committed":
            try:
                record = json.loads(c.value)
                g = int(record["generation"])
            except (ValueError, KeyError, TypeError):
                stale.append(f"committed holds a malformed record at revision {c.rev}")
                continue
            if g >= newest and isinstance(record.get("step"), int):
                in_time.add((g, record["step"]))
        elif c.key.startswith(("ckpt/", "fault/")) and created:
            # A manifest's holders may be updated later under a newer generation's fence: only the creation
            # of a key of generation g is a write *for* generation g.
            g = _gen_of_key(c.key)
        if g is None:
            continue
        seen += 1
        if g < newest:
            stale.append(f"etcd accepted {c.key} of generation {g} at revision {c.rev}, after generation {newest} "
                         f"was created")
    return stale, seen, in_time


def committed_monotonic(history: list[Change] | None, history_error: str | None = None) -> Check:
    """The commit point in etcd only moves forward: a committed step is never replaced by an older one."""
    if history is None:
        return Check("committed_monotonic", FAIL, f"the etcd history could not be read ({history_error}).")
    steps: list[tuple[int, int]] = []
    for c in history:
        if c.key == "committed" and c.type == "put":
            try:
                steps.append((c.rev, int(json.loads(c.value)["step"])))
            except (ValueError, KeyError, TypeError):
                return Check("committed_monotonic", FAIL, f"committed holds a malformed record at revision {c.rev}.")
        elif c.key == "committed" and c.type == "delete":
            return Check("committed_monotonic", FAIL, f"the committed record was deleted at revision {c.rev}.")
    back = [f"step {a} then step {b} (revision {rb})" for (_, a), (rb, b) in zip(steps, steps[1:]) if b < a]
    if back:
        return Check("committed_monotonic", FAIL, "the committed step moved back: " + "; ".join(back[:3]) + ".")
    if not steps:
        return Check("committed_monotonic", NA, "etcd never recorded a committed step.")
    return Check("committed_monotonic", PASS, f"{len(steps)} commit record(s) in etcd, steps only moving forward "
                 f"({steps[0][1]}..{steps[-1][1]}).")


def no_stale_write(events: list[Event], history: list[Change] | None = None,
                   history_error: str | None = None) -> Check:
    """No commit for a superseded generation. The events say when each process saw it; a ``ckpt.committed``
    event is emitted after its transaction returned, so it can trail the next generation's ``gen.formed``
    although etcd accepted the commit first: with the etcd history, etcd's order decides (and the history
    itself is checked for accepted stale writes)."""
    stale: list[str] = []
    etcd_note = ""
    in_time: set[tuple[int, int]] = set()
    if history_error is not None:
        stale.append(f"the etcd history could not be read ({history_error})")
    elif history is not None:
        more, writes, in_time = etcd_stale_writes(history)
        stale += more
        etcd_note = f"; etcd accepted {writes} fenced write(s), none of a superseded generation"
    newest = 0
    commits = 0
    for ev in sorted(events, key=lambda e: e.get("mono", 0.0)):
        g = ev.get("gen")
        if ev.get("kind") == "gen.formed" and isinstance(g, int):
            newest = max(newest, g)
        elif ev.get("kind") == "ckpt.committed" and isinstance(g, int):
            commits += 1
            if g < newest and (g, ev.get("step")) not in in_time:
                stale.append(f"step {ev.get('step')} committed for generation {g} after generation {newest} formed"
                             f" (by {host_of(ev)})")
    if stale:
        return Check("no_stale_write", FAIL, "; ".join(stale[:3]) + ".")
    return Check("no_stale_write", PASS, f"{commits} commit event(s), none from a superseded generation{etcd_note}.")


def restores_consistent(events: list[Event]) -> Check:
    """All ranks restoring in one generation restore the same step (never a mix of, say, a memory step on
    one rank and an older durable step on another: the ranks would train on from different states)."""
    by_gen: dict[Any, dict[Any, Any]] = {}
    for r in _of(events, "restore.done"):
        by_gen.setdefault(r.get("gen"), {})[(host_of(r), r.get("rank"))] = (r.get("step"), r.get("origin"))
    if not by_gen:
        return Check("restores_consistent", NA, "no restore happened.")
    bad = []
    for g, ranks in by_gen.items():
        steps = {st for st, _ in ranks.values()}
        if len(steps) > 1:
            detail = ", ".join(f"rank {rk} step {st} from {o}" for (_, rk), (st, o) in sorted(ranks.items(), key=str))
            bad.append(f"generation {g} restored different steps: {detail}")
    if bad:
        return Check("restores_consistent", FAIL, "; ".join(bad[:2]) + ".")
    return Check("restores_consistent", PASS, f"{len(by_gen)} generation(s) restored, each from one step.")


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


def durable_consistent(problems: list[str] | None, visible_steps: list[int]) -> Check:
    """Every durable checkpoint visible after the run (manifest committed) verifies completely."""
    if problems is None:
        return Check("durable_consistent", NA, "the scenario does not persist.")
    if problems:
        return Check("durable_consistent", FAIL, "; ".join(problems[:3]) + ".")
    if not visible_steps:
        return Check("durable_consistent", NA, "no durable checkpoint is visible after the run.")
    return Check("durable_consistent", PASS, f"{len(visible_steps)} visible checkpoint(s) (steps {visible_steps}), "
                 "each complete and verified.")


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


def commits_resume(scenario: Scenario, m: M.RunMetrics, baseline_final_committed: int | None) -> Check:
    """After the faults, the commit pipeline works again: a successful job ends with (nearly) the same
    newest committed step as the fault-free run, within ``max_steps_recomputed`` or ``COMMIT_LAG_STEPS``
    (a runtime that silently stops committing keeps training on borrowed time: the next fault would lose
    everything since)."""
    if scenario.expect.outcome != "success":
        return Check("commits_resume", NA, "the job is expected to fail.")
    if baseline_final_committed is None:
        return Check("commits_resume", NA, "the fault-free run announced no commit.")
    got = m.final_committed
    slack = scenario.expect.max_steps_recomputed if scenario.expect.max_steps_recomputed is not None \
        else COMMIT_LAG_STEPS
    if got is None or got < baseline_final_committed - slack:
        return Check("commits_resume", FAIL, f"the newest committed step is {got}, the fault-free run committed "
                     f"up to step {baseline_final_committed} (tolerance {slack} steps): committing stopped after "
                     "the fault.")
    return Check("commits_resume", PASS, f"committed up to step {got} (the fault-free run: "
                 f"{baseline_final_committed}).")


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
        if m.max_stall_s is not None:
            # The next step may come fast and training stall afterwards (a commit waiting on a dead etcd
            # member): no pause anywhere may exceed what a recovery is allowed.
            out.append(Check("progress_stall", PASS if m.max_stall_s <= recovery_bound_s else FAIL,
                             f"longest pause without any step {m.max_stall_s:.2f}s, bound {recovery_bound_s:.2f}s."))
    return out


def leftovers(census: dict[str, list[str]]) -> Check:
    left = {k: v for k, v in census.items() if v}
    if left:
        return Check("no_leftovers", FAIL, "left behind by the runtime after the job ended: "
                     + "; ".join(f"{k}: {v[:5]}" for k, v in left.items()) + ".")
    return Check("no_leftovers", PASS, "no process, segment, lease, namespace or rule left behind.")


def verdict(checks: Iterable[Check]) -> str:
    return "fail" if any(c.status == FAIL for c in checks) else "pass"
