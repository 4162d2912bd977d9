"""Metrics of one run, computed from its merged event history alone (pure functions, no I/O).

Definitions (times are monotonic seconds; a fault's time is when the harness saw the evidence that it
fired, the ``at`` field of its ``fault.fired`` event):

- ``detection_s``: first reaction of the runtime after the fault (``worker.exit``, ``worker.hang``,
  ``fault.published``, ``lease.lost``, ``rdzv.round``, ``recover.begin``, a newer ``gen.formed``,
  ``persist.failed``, ``ckpt.verify_failed``) minus the fault time.
- ``recovery_s``: when a newer generation formed after the fault, the first ``step.done`` of a newer
  generation; otherwise the first ``step.done`` past every step completed before the fault; minus the
  fault time (time to useful progress again, the "fault to next completed step").
- ``steps_recomputed``: for each step, the number of generations that completed it, minus one, summed.
- ``restarts``: generation changes after the first generation (every re-rendezvous round that formed).
- ``worker_starts``: ``worker.start`` events (initial spawns included).
- ``timeline``: (t, generation, world size) when each generation was first seen.
- ``goodput``: fault-free training time / this run's training time (first to last completed step).
- ``max_stall_s``: the longest time in which no step completed anywhere (after the first step).
- ``final_committed``: the newest step announced committed (``ckpt.committed``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from resilient.chaos.eventlog import Event

DETECTION_KINDS = frozenset({
    "worker.exit", "worker.hang", "fault.published", "lease.lost", "rdzv.round", "recover.begin",
    "persist.failed", "ckpt.verify_failed", "agent.exit",
})


def step_events(events: Iterable[Event]) -> list[Event]:
    """``step.done`` events, one per (process, generation, step) even if two layers emitted it."""
    seen: set[tuple[Any, Any, Any]] = set()
    out = []
    for ev in events:
        if ev.get("kind") != "step.done" or not isinstance(ev.get("step"), int):
            continue
        key = (ev.get("pid"), ev.get("gen"), ev.get("step"))
        if key in seen:
            continue
        seen.add(key)
        out.append(ev)
    return out


def fault_events(events: Iterable[Event]) -> list[Event]:
    return [ev for ev in events if ev.get("kind") == "fault.fired"]


def fault_time(ev: Event) -> float:
    at = ev.get("at")
    return float(at) if isinstance(at, (int, float)) else float(ev.get("mono", 0.0))


def timeline(events: Iterable[Event]) -> list[tuple[float, int, int]]:
    """(t, gen, world_size) at each generation's first appearance (``gen.formed``, ``rdzv.joined`` or
    ``step.done``), in order of time."""
    first: dict[int, tuple[float, int]] = {}
    for ev in events:
        if ev.get("kind") not in ("gen.formed", "rdzv.joined", "step.done"):
            continue
        gen, ws = ev.get("gen"), ev.get("world_size")
        if not isinstance(gen, int) or not isinstance(ws, int):
            continue
        t = float(ev.get("mono", 0.0))
        if gen not in first or t < first[gen][0]:
            first[gen] = (t, ws)
    return sorted(((t, g, ws) for g, (t, ws) in first.items()), key=lambda x: x[0])


@dataclass
class FaultMetrics:
    id: str
    action: str
    t: float
    detection_s: float | None
    recovery_s: float | None
    last_step_before: int


@dataclass
class RunMetrics:
    t0: float
    faults: list[FaultMetrics] = field(default_factory=list)
    steps_unique: int = 0
    steps_recomputed: int = 0
    restarts: int = 0
    worker_starts: int = 0
    generations: list[int] = field(default_factory=list)
    world_sizes: list[int] = field(default_factory=list)
    timeline: list[tuple[float, int, int]] = field(default_factory=list)
    first_step_t: float | None = None
    last_step_t: float | None = None
    train_s: float | None = None
    goodput: float | None = None
    final_hashes: list[str] = field(default_factory=list)
    final_loss: float | None = None
    max_stall_s: float | None = None  # longest time without any step completing, after the first step
    final_committed: int | None = None  # newest step a ``ckpt.committed`` event announced

    def as_dict(self) -> dict[str, Any]:
        rel = lambda t: None if t is None else round(t - self.t0, 3)  # noqa: E731
        return {
            "faults": [{"id": f.id, "action": f.action, "t": rel(f.t),
                        "detection_s": _r(f.detection_s), "recovery_s": _r(f.recovery_s),
                        "last_step_before": f.last_step_before} for f in self.faults],
            "detection_s": _r(self.faults[0].detection_s) if self.faults else None,
            "recovery_s": _r(self.faults[0].recovery_s) if self.faults else None,
            "steps_unique": self.steps_unique,
            "steps_recomputed": self.steps_recomputed,
            "restarts": self.restarts,
            "worker_starts": self.worker_starts,
            "generations": self.generations,
            "world_sizes": self.world_sizes,
            "timeline": [[rel(t), g, ws] for t, g, ws in self.timeline],
            "train_s": _r(self.train_s),
            "goodput": _r(self.goodput),
            "max_stall_s": _r(self.max_stall_s),
            "final_committed": self.final_committed,
        }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def compute(events: list[Event], *, baseline_train_s: float | None = None, t0: float | None = None) -> RunMetrics:
    """All metrics of a run from its merged, time-ordered history."""
    events = sorted(events, key=lambda e: e.get("mono", 0.0))
    if t0 is None:
        t0 = float(events[0].get("mono", 0.0)) if events else 0.0
    steps = step_events(events)
    m = RunMetrics(t0=t0)
    tl = timeline(events)
    m.timeline = tl
    m.generations = [g for _, g, _ in tl]
    m.world_sizes = []
    for _, _, ws in tl:
        if not m.world_sizes or m.world_sizes[-1] != ws:
            m.world_sizes.append(ws)
    m.restarts = max(0, len(tl) - 1)
    m.worker_starts = sum(1 for ev in events if ev.get("kind") == "worker.start")
    gens_per_step: dict[int, set[Any]] = {}
    for ev in steps:
        gens_per_step.setdefault(ev["step"], set()).add(ev.get("gen"))
    m.steps_unique = len(gens_per_step)
    m.steps_recomputed = sum(len(g) - 1 for g in gens_per_step.values())
    times = sorted(float(ev["mono"]) for ev in steps)
    m.max_stall_s = max((b - a for a, b in zip(times, times[1:])), default=None)
    committed = [ev["step"] for ev in events if ev.get("kind") == "ckpt.committed" and isinstance(ev.get("step"), int)]
    m.final_committed = max(committed) if committed else None
    if steps:
        m.first_step_t = float(steps[0]["mono"])
        m.last_step_t = float(steps[-1]["mono"])
        m.train_s = m.last_step_t - m.first_step_t
        if baseline_train_s and m.train_s > 0:
            m.goodput = baseline_train_s / m.train_s
    for ev in events:
        if ev.get("kind") == "train.done":
            if ev.get("state_hash"):
                m.final_hashes.append(str(ev["state_hash"]))
            if isinstance(ev.get("loss"), (int, float)):
                m.final_loss = float(ev["loss"])
    for fev in fault_events(events):
        m.faults.append(_fault_metrics(fev, events, steps))
    return m


def _gen_at(events: list[Event], t: float) -> int:
    best = 0
    for ev in events:
        if float(ev.get("mono", 0.0)) > t:
            break
        if ev.get("kind") in ("gen.formed", "rdzv.joined", "step.done") and isinstance(ev.get("gen"), int):
            best = max(best, ev["gen"])
    return best


def _fault_metrics(fev: Event, events: list[Event], steps: list[Event]) -> FaultMetrics:
    t = fault_time(fev)
    before = [ev["step"] for ev in steps if float(ev["mono"]) <= t]
    last_before = max(before) if before else -1
    gen_then = _gen_at(events, t)
    detection = None
    for ev in events:
        et = float(ev.get("mono", 0.0))
        if et < t:
            continue
        kind = ev.get("kind")
        newer_gen = kind == "gen.formed" and isinstance(ev.get("gen"), int) and ev["gen"] > gen_then
        if kind in DETECTION_KINDS or newer_gen:
            detection = et - t
            break
    # After a generation change, recovery is the first step completed in a newer generation (a survivor's
    # step already in flight when the fault hit is not a recovery); otherwise the first step past the
    # last one done before the fault.
    newer = any(ev.get("kind") == "gen.formed" and isinstance(ev.get("gen"), int) and ev["gen"] > gen_then
                and float(ev.get("mono", 0.0)) >= t for ev in events)
    recovery = None
    for ev in steps:
        if float(ev["mono"]) < t:
            continue
        if (newer and isinstance(ev.get("gen"), int) and ev["gen"] > gen_then) or (
                not newer and ev["step"] > last_before):
            recovery = float(ev["mono"]) - t
            break
    return FaultMetrics(id=str(fev.get("id", "?")), action=str(fev.get("action", "?")), t=t,
                        detection_s=detection, recovery_s=recovery, last_step_before=last_before)
