"""The background persist's cadence (``resilient.persist.cadence``): the multiples of --persist-every."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from resilient.persist.cadence import late, next_due, persist_due


def test_the_multiples_of_every_are_due_after_the_first_committed_step():
    assert persist_due(1, None, 500)  # nothing persisted yet: the first committed step seen
    assert next_due(1, 500) == 500
    assert not persist_due(499, 1, 500)
    assert persist_due(500, 1, 500) and late(500, 1, 500) == 0
    assert next_due(500, 500) == 1000
    assert persist_due(1003, 500, 500) and late(1003, 500, 500) == 3  # seen 3 steps after it was due
    assert next_due(1003, 500) == 1500  # the next one is on the multiple again, not 500 past 1003


def test_every_zero_means_only_at_sigterm_and_job_end():
    assert not persist_due(10, None, 0) and not persist_due(10, 3, 0)
    assert next_due(3, 0) is None and late(10, 3, 0) == 0


@given(st.integers(1, 50), st.lists(st.integers(1, 7), min_size=1, max_size=200))
def test_one_persist_per_multiple_crossed_and_never_more(every, gaps):
    # the committed steps a monitor tick sees (increasing, any gaps): exactly one persist per multiple of
    # `every` that the steps reach, each the first step seen at or past it
    seen, step = [], 0
    for gap in gaps:
        step += gap
        seen.append(step)
    persisted, last = [], None
    for s in seen:
        if persist_due(s, last, every):
            persisted.append(s)
            last = s
    assert persisted[0] == seen[0]
    windows = [p // every for p in persisted[1:]]
    assert windows == sorted(set(windows))  # at most one per multiple
    for p in persisted[1:]:
        earlier = [s for s in seen if s < p]
        assert earlier and earlier[-1] // every < p // every  # the first step seen past its multiple
    crossed = {s // every for s in seen if s // every > seen[0] // every}
    assert set(windows) == crossed  # and every multiple reached got one
