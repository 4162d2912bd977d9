"""Time bounds derived from a calibration (fault-free baseline) run instead of hard-coded numbers.

The baseline of a scenario runs the same script, training, runtime and launch hosts without faults. From
it: ``startup_s`` (harness start to first completed step: process start, import, rendezvous), ``step_s``
(median step time) and ``total_s``. A scenario's deadline and recovery bound are multiples (its
``slack``, 2 in CI) of these plus the detection budget its faults imply (monitor interval for a crash,
hang timeout for a hang, lease TTL for a silent host).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from resilient.chaos import metrics as M
from resilient.chaos.eventlog import Event
from resilient.chaos.scenario import Fault, Runtime, Scenario


@dataclass(frozen=True)
class Calibration:
    key: str
    state_hash: str | None
    final_loss: float | None
    startup_s: float
    step_s: float
    total_s: float
    train_s: float
    run_dir: str
    max_step_gap_s: float = 0.0  # longest pause between two steps of one worker: how loaded the machine is
    final_committed: int | None = None  # newest step the fault-free run committed
    start_spread_s: float = 0.0  # first to last agent.start of the launch hosts (they are launched together)


    def to_json(self) -> dict[str, Any]:
        return asdict(self)


BASELINE_HANG_TIMEOUT_S = 30.0  # the fault-free run must not be cut short by a watchdog on a loaded machine
BASELINE_LEASE_TTL_S = 3


def baseline_runtime(scenario: Scenario) -> Runtime:
    """The runtime settings of the fault-free run: the same for every scenario of a configuration, so one
    baseline serves them all (the final state must not depend on snapshot, replica or persist settings:
    comparing a scenario with persistence against a baseline without is part of the test). Every launch
    host must join the first generation (min_nodes = all of them) and no watchdog may fire spuriously."""
    return Runtime(lease_ttl=BASELINE_LEASE_TTL_S, hang_timeout=BASELINE_HANG_TIMEOUT_S,
                   min_nodes=len(scenario.topology.launch_hosts))


@functools.lru_cache(maxsize=1)
def code_hash() -> str:
    """Hash of the runtime's source (Python and native, the harness excluded): a cached baseline is reused
    only by the code that produced it."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    files = sorted(p for p in root.rglob("*") if p.suffix in (".py", ".cpp", ".cc", ".h", ".so")
                   and "chaos" not in p.relative_to(root).parts and "__pycache__" not in p.parts)
    native = root.parent / "native"
    if native.is_dir():
        files += sorted(p for p in native.rglob("*") if p.suffix in (".cpp", ".cc", ".h", ".cu"))
    for p in files:
        h.update(str(p).encode())
        try:
            h.update(p.read_bytes())
        except OSError:
            continue
    return h.hexdigest()[:16]


def key(scenario: Scenario, script: Path, seed: int) -> str:
    """Baselines are shared by every scenario with the same script, training, seed and launch hosts; the
    runtime settings of the baseline are ``baseline_runtime`` and it always runs on loopback (the final
    state cannot depend on the network, and namespaces add no measurable start-up time)."""
    h = hashlib.sha256()
    h.update(script.read_bytes())
    h.update(json.dumps({
        "training": asdict(scenario.training), "runtime": asdict(baseline_runtime(scenario)), "seed": seed,
        "hosts": [(x.name, x.workers) for x in scenario.topology.launch_hosts], "code": code_hash(),
    }, sort_keys=True).encode())
    return h.hexdigest()[:16]


def fault_free_problems(events: list[Event], exit_codes: dict[str, int | None]) -> list[str]:
    """Why a baseline run is not a clean fault-free run (empty when it is): it must form exactly one
    generation, never restore, never report a hang, every worker and agent must exit 0, and every rank
    must finish with the same state hash."""
    out = []
    m = M.compute(events)
    if len(m.generations) != 1:
        out.append(f"it went through generations {m.generations} (a fault-free run forms one)")
    hangs = [ev for ev in events if ev.get("kind") == "worker.hang"]
    if hangs:
        out.append(f"{len(hangs)} worker.hang event(s), first rank {hangs[0].get('rank')} on "
                   f"{hangs[0].get('node')} (beat age {hangs[0].get('beat_age')})")
    restores = [ev for ev in events if ev.get("kind") == "restore.done"]
    if restores:
        out.append(f"{len(restores)} restore(s) happened")
    bad_exits = [ev for ev in events if ev.get("kind") == "worker.exit"
                 and (ev.get("exitcode") not in (0, None) or ev.get("signal"))]
    if bad_exits:
        ev = bad_exits[0]
        out.append(f"worker rank {ev.get('rank')} on {ev.get('node')} exited with code {ev.get('exitcode')} "
                   f"signal {ev.get('signal')}")
    codes = {h: c for h, c in exit_codes.items() if c not in (0, None)}
    if codes:
        out.append(f"agents exited with {codes}")
    if len(set(m.final_hashes)) > 1:
        out.append(f"ranks finished with different hashes {sorted(set(m.final_hashes))}")
    return out


def from_events(k: str, events: list[Event], t_start: float, run_dir: str) -> Calibration:
    m = M.compute(events, t0=t_start)
    steps = M.step_events(events)
    times = sorted({ev["step"]: float(ev["mono"]) for ev in steps}.items())
    deltas = sorted(b[1] - a[1] for a, b in zip(times, times[1:]))
    step_s = deltas[len(deltas) // 2] if deltas else 0.0
    done = [float(ev["mono"]) for ev in events if ev.get("kind") == "train.done"]
    end = max(done) if done else (m.last_step_t or t_start)
    per_pid: dict[Any, list[float]] = {}
    for ev in steps:
        per_pid.setdefault(ev.get("pid"), []).append(float(ev["mono"]))
    gaps = [b - a for ts in per_pid.values() for a, b in zip(sorted(ts), sorted(ts)[1:])]
    return Calibration(
        key=k, state_hash=m.final_hashes[0] if len(set(m.final_hashes)) == 1 else None, final_loss=m.final_loss,
        startup_s=(m.first_step_t - t_start) if m.first_step_t else 0.0, step_s=step_s, total_s=end - t_start,
        train_s=m.train_s or 0.0, run_dir=run_dir, max_step_gap_s=max(gaps, default=0.0),
        final_committed=m.final_committed,
        start_spread_s=_start_spread(events),
    )


def _start_spread(events: list[Event]) -> float:
    starts: dict[Any, float] = {}
    for ev in events:
        if ev.get("kind") == "agent.start":
            starts.setdefault(ev.get("node"), float(ev["mono"]))
    return (max(starts.values()) - min(starts.values())) if len(starts) > 1 else 0.0


def adapt_runtime(scenario: Scenario, cal: Calibration) -> tuple[Scenario, list[str]]:
    """The scenario with its failure-detection timeouts raised to what this machine needs now: a hang
    timeout or lease TTL shorter than ``2 × slack ×`` the longest pause between two steps of the fault-free
    run would declare a merely slow process dead. The declared values are minimums; every change is
    returned as a sentence for the report."""
    rt = scenario.runtime
    floor = 2.0 * scenario.slack * cal.max_step_gap_s
    notes = []
    hang = rt.hang_timeout
    if floor > hang:
        hang = float(math.ceil(floor))
        notes.append(f"hang_timeout {rt.hang_timeout:g}s -> {hang:g}s")
    leave = rt.leave_timeout
    if floor > leave:
        leave = float(math.ceil(floor))
        notes.append(f"leave_timeout {rt.leave_timeout:g}s -> {leave:g}s")
    ttl = rt.lease_ttl
    if floor > ttl:
        ttl = int(math.ceil(floor))
        notes.append(f"lease_ttl {rt.lease_ttl}s -> {ttl}s")
    why = (f" (the fault-free run paused up to {cal.max_step_gap_s:.2f}s between steps; timeouts are at least "
           f"2 x slack {scenario.slack:g} x that)")
    notes = [n + why for n in notes]
    last_call = rt.last_call
    if not last_call:
        # Hosts launched together must form the first generation together: a round that closes as soon as
        # min_nodes joined would start a 2-host job at world size 1 whenever one agent starts late.
        last_call = float(max(1, math.ceil(2.0 * scenario.slack * cal.start_spread_s + 1.0)))
        notes.append(f"last_call {last_call:g}s (agents launched together started up to {cal.start_spread_s:.2f}s "
                     f"apart in the fault-free run)")
    runtime = dataclasses.replace(rt, hang_timeout=hang, leave_timeout=leave, lease_ttl=ttl, last_call=last_call)
    return dataclasses.replace(scenario, runtime=runtime), notes


def load(path: Path) -> Calibration | None:
    try:
        return Calibration(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def detection_budget(fault: Fault, scenario: Scenario) -> float:
    rt = scenario.runtime
    lease = rt.lease_ttl + rt.lease_ttl / 3
    return {
        "kill_worker": rt.monitor_interval, "kill_agent": lease,
        "hang": min(rt.hang_timeout, rt.leave_timeout) if fault.params.get("mode") == "sleep" else rt.hang_timeout,
        "host_loss": lease + float(fault.params.get("silence_s", 1.0)), "pause_node": lease,
        "partition": lease, "etcd_kill": 2.0, "failpoint": lease, "scale_up": 0.0,
        "slow_link": float(fault.params.get("delay_ms", 100)) / 1000 * 10, "corrupt_replica": lease,
        "disk_full": 0.0,
    }.get(fault.action, lease)


def recovery_bound(scenario: Scenario, cal: Calibration) -> float:
    worst = max((detection_budget(f, scenario) for f in scenario.faults), default=0.0)
    return scenario.slack * (worst + cal.startup_s + 10 * cal.step_s + 1.0)


def deadline(scenario: Scenario, cal: Calibration | None) -> float:
    if scenario.deadline_s is not None:
        return scenario.deadline_s
    base = cal.total_s if cal else 60.0
    extra = 0.0
    for f in scenario.faults:
        extra += detection_budget(f, scenario) + (f.heal.after or 0.0) + float(f.params.get("seconds", 0) or 0)
        extra += f.trigger.delay + (cal.startup_s if cal else 10.0)
    return scenario.slack * (base + extra) + 10.0
