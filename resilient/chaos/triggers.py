"""When each fault is due: a pure state machine fed with events and the current time (no sleeping, no I/O).

The runner feeds every new event to ``observe`` and asks ``due(now)`` on each tick; it calls ``started``
when it begins an injection and ``fired`` when it has the evidence that the fault took place (which
``after`` triggers chain on). A trigger matches once; its optional ``delay`` is added to the match time.
"""

from __future__ import annotations

from typing import Iterable

from resilient.chaos.eventlog import Event, host_of, matches
from resilient.chaos.scenario import Fault


class TriggerEngine:
    def __init__(self, faults: Iterable[Fault]) -> None:
        self.faults = list(faults)
        self._matched: dict[str, float] = {}  # fault id -> time its condition became true
        self._started: set[str] = set()
        self._fired: dict[str, float] = {}
        self._first_step_t: float | None = None

    def observe(self, events: Iterable[Event]) -> None:
        for ev in events:
            t = float(ev.get("mono", 0.0))
            if ev.get("kind") == "step.done" and self._first_step_t is None:
                self._first_step_t = t
            for f in self.faults:
                if f.id in self._matched:
                    continue
                if self._event_matches(f, ev):
                    self._matched[f.id] = t

    def _event_matches(self, f: Fault, ev: Event) -> bool:
        trig = f.trigger
        if trig.kind == "step":
            return (ev.get("kind") == "step.done" and isinstance(ev.get("step"), int) and ev["step"] >= trig.value
                    and (trig.host is None or host_of(ev) == trig.host))
        if trig.kind == "event":
            return matches(ev, trig.value, dict(trig.where), trig.host)
        if trig.kind == "failpoint":
            host = trig.host or f.target.get("host")
            return matches(ev, "failpoint.fired", {"name": trig.value}, host)
        return False

    def due(self, now: float) -> list[Fault]:
        out = []
        for f in self.faults:
            if f.id in self._started:
                continue
            trig = f.trigger
            if trig.kind == "at":
                self._matched.setdefault(f.id, now)
            elif trig.kind == "time" and self._first_step_t is not None:
                self._matched.setdefault(f.id, self._first_step_t + trig.value)
            elif trig.kind == "after" and trig.value in self._fired:
                self._matched.setdefault(f.id, self._fired[trig.value])
            t = self._matched.get(f.id)
            if t is not None and now >= t + trig.delay:
                out.append(f)
        return out

    def started(self, fault_id: str) -> None:
        self._started.add(fault_id)

    def fired(self, fault_id: str, t: float) -> None:
        self._fired.setdefault(fault_id, t)

    def pending(self) -> list[str]:
        """Faults whose injection has not started."""
        return [f.id for f in self.faults if f.id not in self._started]

    def unfired(self) -> list[str]:
        return [f.id for f in self.faults if f.id not in self._fired]
