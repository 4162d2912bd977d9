"""The hang decision, pure: time is passed in, nothing sleeps or reads clocks here.

A worker is hung when hang detection is on, it has beaten at least once (so a slow import or the first
compilation never counts), it is not waiting for a new generation (no beats are expected then), and
its last beat is older than the hang timeout. The reference point is the later of the last beat and the
moment the current generation was handed to the worker, so process-group set-up and restore after a
recovery get a full timeout of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

NOT_BEATING_STATES = ("recovering", "done", "failed")


@dataclass(frozen=True)
class HangVerdict:
    hung: bool
    beat_age_s: float


def decide(
    *,
    now_ns: int,
    beats: int,
    beat_mono_ns: int,
    state: str,
    generation_handed_ns: int,
    hang_timeout: float | None,
    round_pending: bool,
) -> HangVerdict:
    reference = max(beat_mono_ns, generation_handed_ns)
    age = max(0.0, (now_ns - reference) / 1e9)
    if hang_timeout is None or beats <= 0 or round_pending or state in NOT_BEATING_STATES:
        return HangVerdict(False, age)
    return HangVerdict(age > hang_timeout, age)


def suspicion(proc_state: str) -> int:
    """Order among several silent workers (lower: more likely the culprit). A stopped process or one
    spinning in C code is the cause; one sleeping is usually a peer blocked in a collective waiting for it."""
    return {"T": 0, "t": 0, "R": 1, "D": 2}.get(proc_state, 3)
