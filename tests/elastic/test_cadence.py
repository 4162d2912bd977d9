"""The snapshot cadence: ranks that each decide alone still snapshot common steps, so commits keep coming
while replication lags, and the stride comes back down when it catches up."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient.elastic.cadence import SnapshotCadence
from resilient.errors import ConfigError


def simulate(ranks: int, steps: int, latency: tuple[int, int], seen_delay: tuple[int, int], seed: int,
             every: int = 1, break_alignment: bool = False) -> tuple[list[tuple[int, int]], list[int]]:
    """A job of ``ranks`` lockstep ranks. Each rank's agent replicates one snapshot at a time (``latency``
    steps each; the newest waiting snapshot replaces an older waiting one); a step commits when every
    rank's agent has replicated it; each rank sees a commit ``seen_delay`` steps late. A rank's new
    snapshot replaces its newest uncommitted one (two slots, the committed copy kept), which destroys a
    replication of it still in flight. Returns the commits (step, at) and the final strides."""
    rnd = random.Random(seed)
    cadences = [SnapshotCadence(every) for _ in range(ranks)]
    inflight: list[tuple[int, int] | None] = [None] * ranks
    waiting: list[int | None] = [None] * ranks
    replicated: list[set[int]] = [set() for _ in range(ranks)]
    views: list[list[tuple[int, int]]] = [[] for _ in range(ranks)]
    seen: list[int | None] = [None] * ranks
    committed: int | None = None
    commits: list[tuple[int, int]] = []
    for t in range(1, steps + 1):
        for r in range(ranks):
            if inflight[r] is not None and inflight[r][1] <= t:
                replicated[r].add(inflight[r][0])
                inflight[r] = None
            if inflight[r] is None and waiting[r] is not None:
                inflight[r] = (waiting[r], t + rnd.randint(*latency))
                waiting[r] = None
        common = set.intersection(*replicated)
        if common and (committed is None or max(common) > committed):
            committed = max(common)
            commits.append((committed, t))
            for r in range(ranks):
                views[r].append((t + rnd.randint(*seen_delay), committed))
        for r in range(ranks):
            for at, step in views[r]:
                if at <= t and (seen[r] is None or step > seen[r]):
                    seen[r] = step
            cadence = cadences[r]
            cadence.observe(t, seen[r])
            due = cadence.due(t, seen[r])
            if break_alignment and r == 0:
                due = seen[r] is None or seen[r] >= (cadence.written or 0)  # "whenever the last one committed"
            if due:
                cadence.took(t)
                if inflight[r] is not None and inflight[r][0] != committed:
                    inflight[r] = None
                waiting[r] = t
    return commits, [c.stride for c in cadences]


@settings(max_examples=150, deadline=None)
@given(
    ranks=st.integers(2, 8),
    lo=st.integers(0, 12),
    spread=st.integers(0, 10),
    delay=st.integers(0, 3),
    every=st.sampled_from([1, 2, 5]),
    seed=st.integers(0, 2**16),
)
def test_commits_keep_coming_whatever_the_replication_lag(ranks, lo, spread, delay, every, seed):
    latency = (lo, lo + spread)
    commits, strides = simulate(ranks, 800, latency, (0, delay), seed, every=every)
    late = [at for _, at in commits if at > 400]
    assert late, f"no commit in the second half: commits {commits[-5:]}, strides {strides}"
    gaps = [b - a for (_, a), (_, b) in zip(commits, commits[1:]) if a > 300]
    bound = 4 * (latency[1] + delay + 2) * every + 2 * every
    assert not gaps or max(gaps) <= bound, f"gap {max(gaps)} > {bound} between commits (strides {strides})"
    assert max(strides) * every <= bound


def test_the_simulation_can_fail_when_ranks_pick_steps_alone():
    """The simulated failure this module prevents: one rank snapshotting "whenever its previous snapshot
    committed" drifts off the others' steps and commits stop (so the property above is not vacuous)."""
    broken, _ = simulate(3, 600, (3, 7), (0, 2), seed=1, break_alignment=True)
    aligned, _ = simulate(3, 600, (3, 7), (0, 2), seed=1)
    assert not broken and len(aligned) > 20


def test_stride_doubles_while_behind_and_halves_when_commits_are_quick():
    c = SnapshotCadence(1)
    assert c.due(1, None)
    c.took(1)
    assert c.due(2, None) and c.stride == 2  # 1 still uncommitted: stride 2, and 2 is on it
    c.took(2)
    assert not c.due(3, None)
    assert c.due(4, None) and c.stride == 4  # 2 still uncommitted
    c.took(4)
    c.observe(5, 4)  # committed one step later
    assert not c.due(6, 4) and not c.due(7, 4)
    assert c.due(8, 4) and c.stride == 2


def test_stride_is_capped_and_periodic_snapshots_can_be_off():
    c = SnapshotCadence(1, max_stride=4)
    c.took(1)
    for t in range(2, 40):
        c.due(t, None)
    assert c.stride == 4
    off = SnapshotCadence(0)
    assert not any(off.due(t, None) for t in range(1, 10))


def test_a_new_generation_forgets_the_pending_snapshot_but_keeps_the_stride():
    c = SnapshotCadence(1)
    c.took(1)
    assert c.due(2, None) and c.stride == 2
    c.took(2)
    c.new_generation()  # 2 can never commit now
    assert c.due(4, None) and c.stride == 2, "nothing pending in the new generation: no doubling"


@pytest.mark.parametrize("kw", [{"every": -1}, {"every": 1, "max_stride": 3}, {"every": 1, "max_stride": 0}])
def test_bad_settings_are_refused(kw):
    with pytest.raises(ConfigError):
        SnapshotCadence(**kw)
