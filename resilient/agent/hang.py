"""The hang and leave decisions, pure: time is passed in, nothing sleeps or reads clocks here.

A worker is hung when hang detection is on, it has beaten at least once (so a slow import or the first
compilation never counts), it is not waiting for a new generation (no beats are expected then), and
its last beat is older than the hang timeout. The reference point is the later of the last beat and the
moment the current generation was handed to the worker, so process-group set-up and restore after a
recovery get a full timeout of their own.

A worker must leave its generation once the agent announced the next one: its collectives of the old one
fail (gloo: ``elastic/groupsockets``) or its step loop stops at the next step boundary, and it starts
recovering. One that still runs the old generation ``leave_timeout`` seconds later is stuck where nothing
reaches it (a CUDA synchronisation on a NCCL collective whose peer is gone, a C call that never returns):
``must_leave`` and ``LeaveClock`` decide it; the agent kills it and replaces it.
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


def must_leave(*, state: str, beats: int, generation: int, target: int) -> bool:
    """Whether a worker still runs a generation that is over: it was told that generation ``target`` is coming
    (its control block's target) and neither left its own (``generation``) for it nor started recovering.
    Not before its first beat: a worker still setting up (loading data or a pretrained model, compiling)
    reads the target when it enters its step loop, like one still starting."""
    return state == "running" and beats > 0 and target > generation


@dataclass
class LeaveClock:
    """Seconds a worker has had, at the agent's checks, to leave a generation that is over.

    Time counts between consecutive checks while the worker must leave, a gap longer than ``gap_cap_s``
    counting as ``gap_cap_s``: a paused host (SIGSTOP, a VM freeze) or a starved agent resumes with its
    workers, which then get their time to leave instead of being judged on the pause."""

    waited_s: float = 0.0
    last_ns: int | None = None

    def tick(self, now_ns: int, must: bool, gap_cap_s: float) -> float:
        """Account for the check at ``now_ns``; ``must``: the worker must leave now. Returns the time it had."""
        if not must:
            self.waited_s, self.last_ns = 0.0, None
            return 0.0
        if self.last_ns is not None:
            self.waited_s += min(max(0.0, (now_ns - self.last_ns) / 1e9), gap_cap_s)
        self.last_ns = now_ns
        return self.waited_s
