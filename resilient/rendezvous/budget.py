"""The job-wide restart budget, kept in etcd (``restarts`` key) so no node can bypass it by rejoining.

One restart is charged per generation that ends in a restart, however many agents report it: the record
remembers which generations were charged. With a window, only charges younger than ``window`` seconds
(wall clock, shared by all hosts) count against ``max_restarts``. Updates are compare-and-swap on the
key's revision, retried on conflict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from resilient.errors import RendezvousError, RestartBudgetExceededError


@dataclass(frozen=True)
class Charge:
    generation: int
    at: float  # wall clock
    reason: str


@dataclass(frozen=True)
class BudgetRecord:
    total: int = 0  # restarts charged over the whole job
    charges: tuple[Charge, ...] = ()  # the recent ones (enough to evaluate the window)

    def to_json(self) -> bytes:
        return json.dumps(
            {"total": self.total, "charges": [[c.generation, c.at, c.reason] for c in self.charges]},
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "BudgetRecord":
        try:
            d = json.loads(raw)
            return cls(int(d["total"]), tuple(Charge(int(g), float(t), str(r)) for g, t, r in d["charges"]))
        except (ValueError, TypeError, KeyError) as exc:
            raise RendezvousError(f"Malformed restart budget record {raw[:200]!r} in etcd: {exc}.") from exc


def counted(record: BudgetRecord, now: float, window: float | None) -> int:
    """Charges that count against the budget at ``now``."""
    if window is None:
        return record.total
    return sum(1 for c in record.charges if now - c.at < window)


def charge(
    record: BudgetRecord, generation: int, reason: str, now: float, max_restarts: int, window: float | None
) -> tuple[BudgetRecord, bool]:
    """Charge one restart for leaving ``generation``: (new record, whether anything changed).

    Raises RestartBudgetExceededError when the budget is spent. A generation already charged is not
    charged again (several agents report the same round).
    """
    if any(c.generation == generation for c in record.charges):
        return record, False
    used = counted(record, now, window)
    if used >= max_restarts:
        span = f"in the last {window:g} s" if window is not None else "in this job"
        raise RestartBudgetExceededError(
            f"Restart budget spent: {used} restart(s) {span}, max_restarts={max_restarts}; not restarting "
            f"after generation {generation} ({reason}). Raise --max-restarts or fix the failure "
            f"(last reasons: {', '.join(c.reason for c in record.charges[-3:]) or 'none'})."
        )
    kept = [c for c in record.charges if window is None or now - c.at < window]
    kept.append(Charge(generation, now, reason))
    keep = max(max_restarts, 1) + 1
    return BudgetRecord(record.total + 1, tuple(kept[-keep:])), True
