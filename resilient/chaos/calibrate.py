"""Time bounds derived from a calibration (fault-free baseline) run instead of hard-coded numbers.

The baseline of a scenario runs the same script, training, runtime and launch hosts without faults. From
it: ``startup_s`` (harness start to first completed step: process start, import, rendezvous), ``step_s``
(median step time) and ``total_s``. A scenario's deadline and recovery bound are multiples (its
``slack``, 2 in CI) of these plus the detection budget its faults imply (monitor interval for a crash,
hang timeout for a hang, lease TTL for a silent host).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from resilient.chaos import metrics as M
from resilient.chaos.eventlog import Event
from resilient.chaos.scenario import Fault, Scenario


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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def key(scenario: Scenario, script: Path, seed: int) -> str:
    h = hashlib.sha256()
    h.update(script.read_bytes())
    h.update(json.dumps({
        "training": asdict(scenario.training), "runtime": asdict(scenario.runtime), "seed": seed,
        "hosts": [(x.name, x.workers) for x in scenario.topology.launch_hosts],
        "network": scenario.topology.network,
    }, sort_keys=True).encode())
    return h.hexdigest()[:16]


def from_events(k: str, events: list[Event], t_start: float, run_dir: str) -> Calibration:
    m = M.compute(events, t0=t_start)
    steps = M.step_events(events)
    times = sorted({ev["step"]: float(ev["mono"]) for ev in steps}.items())
    deltas = sorted(b[1] - a[1] for a, b in zip(times, times[1:]))
    step_s = deltas[len(deltas) // 2] if deltas else 0.0
    done = [float(ev["mono"]) for ev in events if ev.get("kind") == "train.done"]
    end = max(done) if done else (m.last_step_t or t_start)
    return Calibration(
        key=k, state_hash=m.final_hashes[0] if len(set(m.final_hashes)) == 1 else None, final_loss=m.final_loss,
        startup_s=(m.first_step_t - t_start) if m.first_step_t else 0.0, step_s=step_s, total_s=end - t_start,
        train_s=m.train_s or 0.0, run_dir=run_dir,
    )


def load(path: Path) -> Calibration | None:
    try:
        return Calibration(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def detection_budget(fault: Fault, scenario: Scenario) -> float:
    rt = scenario.runtime
    lease = rt.lease_ttl + rt.lease_ttl / 3
    return {
        "kill_worker": rt.monitor_interval, "hang": rt.hang_timeout, "kill_agent": lease,
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
