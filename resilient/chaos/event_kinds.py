"""Every event kind the runtime and the harness emit: what a scenario may trigger on or expect.

A scenario that names a kind nobody emits (``reactions: [worker.exitt]``, ``trigger: {event: no.such}``)
can never be satisfied: the trigger never fires, the reaction never appears. ``scenario.parse`` refuses
such a kind with the nearest known one. ``tests/chaos/test_scenario.py`` checks this list against the
sources both ways (every kind emitted with a literal under ``resilient/`` is listed here, and every kind
listed here is still written somewhere), so it cannot go stale.
"""

from __future__ import annotations

import difflib

KNOWN_EVENT_KINDS: frozenset[str] = frozenset({
    # the agent and its workers (docs/operations.md lists them with their fields)
    "agent.exit", "agent.preempted", "agent.start",
    "ckpt.committed", "ckpt.set_aside", "ckpt.verify_failed",
    "collectives.abort",
    "failpoint.fired",
    "fault.published",
    "gen.formed",
    "lease.lost",
    "persist.begin", "persist.commit", "persist.done", "persist.failed", "persist.on_committed_failed",
    "persist.retention", "persist.shard", "persist.submitted", "persist.superseded",
    "rdzv.joined", "rdzv.round",
    "recover.begin", "recover.done",
    "replica.sent", "replica.skipped",
    "restore.done", "restore.plan",
    "snapshot.cadence", "snapshot.sealed", "snapshot.skipped", "snapshot.stopped", "snapshot.uncommitted",
    "standby.start",
    "step.done",
    "train.done",
    "worker.exec", "worker.exit", "worker.hang", "worker.ready", "worker.start", "worker.stuck",
    # the harness (docs/chaos.md, "The harness's events")
    "chaos.inspected", "chaos.inworker", "chaos.run.end", "chaos.run.start", "chaos.stopped",
    "fault.failed", "fault.fired", "fault.healed", "fault.step",
})


def unknown_kind_hint(kind: str) -> str:
    """``" Did you mean 'x'?"`` for the nearest known kind, or a pointer to the list."""
    close = difflib.get_close_matches(kind, sorted(KNOWN_EVENT_KINDS), n=1, cutoff=0.6)
    if close:
        return f" Did you mean {close[0]!r}?"
    return " The kinds are listed in docs/operations.md (runtime) and docs/chaos.md (harness)."
