"""Misuse of the step loop and of ``protect`` is refused or reported, never silently accepted: a second
``ctx.steps(total)`` past the total (an epoch loop) warns once, two open step loops and ``protect`` after
the loop began raise ``StateError``. The documented uses keep working: a second loop continues from the
completed steps, a loop left with ``break`` is closed, a restored run that already reached the total
yields nothing without a warning."""

from __future__ import annotations

import logging

import pytest
import torch

from resilient.elastic.context import Context
from resilient.elastic.snapshots import SnapshotWriter
from resilient.errors import StateError


def _context(runtime, writer) -> Context:
    return Context(runtime=runtime, assignment=runtime.assignment(), device=torch.device("cpu"), writer=writer,
                   snapshot_every=0, seed=0)


@pytest.fixture
def writer(local_runtime):
    """The context's snapshot writer, closed when the test ends (passed or failed)."""
    writer = SnapshotWriter(local_runtime)
    try:
        yield writer
    finally:
        writer.close()


@pytest.fixture
def ctx(local_runtime, writer) -> Context:
    """A fresh Context with a model protected, before its step loop."""
    ctx = _context(local_runtime, writer)
    ctx.protect(model=torch.nn.Linear(2, 2))
    return ctx


@pytest.fixture
def warnings_of_resilient(caplog):
    """WARNING records of the resilient loggers (which may not propagate to the root logger)."""
    root = logging.getLogger("resilient")
    root.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="resilient"):
            yield lambda: [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    finally:
        root.removeHandler(caplog.handler)


def test_an_epoch_loop_over_steps_warns_once_that_total_is_a_total(warnings_of_resilient, ctx):
    per_epoch = [list(ctx.steps(4)) for _ in range(3)]
    assert per_epoch == [[0, 1, 2, 3], [], []]
    said = [m for m in warnings_of_resilient() if "ctx.steps(4) yields nothing" in m]
    assert len(said) == 1
    assert "4 steps are already completed" in said[0] and "not a count per call" in said[0]


def test_a_second_loop_continues_from_the_completed_steps_without_a_warning(warnings_of_resilient, ctx):
    assert list(ctx.steps(3)) == [0, 1, 2]
    assert list(ctx.steps(5)) == [3, 4]  # total is the run's total: the documented warm-up/main split
    for s in ctx.steps(8):
        if s == 6:
            break  # the abandoned loop is closed, so the next one may start
    assert list(ctx.steps(8)) == [6, 7]
    assert not [m for m in warnings_of_resilient() if "yields nothing" in m]


def test_a_restored_run_that_reached_the_total_yields_nothing_without_a_warning(local_runtime, warnings_of_resilient,
                                                                                writer, ctx):
    first = ctx
    assert list(first.steps(3)) == [0, 1, 2]
    assert first.snapshot() == 3
    again = _context(local_runtime, writer)  # what an in-process recovery builds
    again.protect(model=torch.nn.Linear(2, 2))
    assert again.restored_step == 3
    assert list(again.steps(3)) == []
    assert not [m for m in warnings_of_resilient() if "yields nothing" in m]


def test_two_open_step_loops_are_refused(ctx):
    outer = ctx.steps(5)
    assert next(outer) == 0
    assert next(outer) == 1  # step 0 done, suspended at step 1
    with pytest.raises(StateError, match=r"earlier ctx.steps\(\) loop is still open \(suspended at step 1\)"):
        next(ctx.steps(5))
    outer.close()
    assert list(ctx.steps(5)) == [1, 2, 3, 4]  # once closed, a new loop continues from the completed steps


def test_protect_after_the_loop_began_is_refused(local_runtime, writer, ctx):
    loop = ctx.steps(4)
    ctx.protect(head=torch.nn.Linear(2, 1))  # the generator has not started: still before the loop
    next(loop)
    with pytest.raises(StateError, match=r"ctx.protect\(extra=...\) was called after the step loop began .*"
                                         r"before the first ctx.steps\(\)"):
        ctx.protect(extra=torch.nn.Linear(2, 1))
    list(loop)
    with pytest.raises(StateError, match="after the step loop began"):
        ctx.protect(late=1.0)  # after the loop ended, too
    assert ctx.snapshot() == 4
    # a recovery re-runs the function with a new Context: protecting before its loop restores as usual
    model, head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    again = _context(local_runtime, writer)
    again.protect(model=model, head=head)
    assert again.restored_step == 4
