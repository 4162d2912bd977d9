"""When a committed step is due for a background persist (``--persist-every N``). Pure: no clock, no I/O.

The persisted steps follow the multiples of ``N``: a step is due once it reaches the first multiple of
``N`` after the last step persisted (``N = 500``: 500, 1000, 1500 ...). The agent sees the committed step
once per monitor tick and only the newest committed snapshot is in memory, so with steps faster than the
tick the step persisted is the first committed one seen at or past each multiple (``late``: by how many
steps). When nothing was persisted yet, the first committed step seen is due: an early checkpoint of a
fresh job.
"""

from __future__ import annotations


def next_due(last: int | None, every: int) -> int | None:
    """The step the next background persist waits for (None: the first committed step seen; also None
    when ``every`` is 0: only at SIGTERM and at job end)."""
    if every <= 0 or last is None:
        return None
    return (last // every + 1) * every


def persist_due(step: int, last: int | None, every: int) -> bool:
    """Whether committed ``step`` is due, the last persisted (or requested) step being ``last``."""
    if every <= 0:
        return False
    due = next_due(last, every)
    return due is None or step >= due


def late(step: int, last: int | None, every: int) -> int:
    """How many steps past the multiple it was due at ``step`` is persisted (0: exactly at it)."""
    due = next_due(last, every)
    return 0 if due is None else max(0, step - due)
