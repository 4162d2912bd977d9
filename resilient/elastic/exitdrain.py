"""At interpreter exit, let gloo's worker threads finish touching Python before finalization starts.

torch 2.13 stashes a ``contextvars`` context in thread-local state for every backward pass
(``torch.autograd.graph._engine_run_backward``), and a gloo collective launched inside backward (DDP's
bucket all-reduce) copies that state into its ``AsyncWork``. The gloo worker thread (``pt_gloo_runloop``)
drops the last reference to a finished work, which decrefs the context and so takes the GIL. When the
main thread reaches ``Py_FinalizeEx`` first (a script that returns right after its last backward), the
worker's GIL acquisition ends the thread mid-destructor and the process dies with ``terminate called
without an active exception`` (SIGABRT) after a successful run. ``destroy_process_group`` does not help:
gloo has no ``shutdown``, and DDP keeps the group (and its threads) alive until the module is collected.
Reproduced with plain torch (two ranks under torchrun, DDP, gloo): 7 of 30 runs (upstream: pytorch
issue 190489).

The fix here runs from ``atexit``, before finalization: it releases the GIL in short sleeps until every
gloo worker thread has been asleep (``S`` in ``/proc/self/task/*/stat``) for ``SETTLE_POLLS`` looks in a
row. A worker waiting for the GIL wakes as soon as the main thread sleeps, so a worker asleep across
several GIL-free pauses is parked in its idle wait, not in the GIL. Bounded by ``BUDGET_S``; processes
without gloo threads return at once. Workers launched by ``resilient-run`` leave with ``os._exit`` after
the atexit hooks and never finalize, so this matters under plain torchrun and ``python train.py``.
"""

from __future__ import annotations

import atexit
import os
import time
from typing import Callable, Iterable

from resilient import logs

log = logs.get_logger(__name__)

GLOO_WORKER = "pt_gloo_runloop"  # the thread name ProcessGroupGloo gives its workers
SETTLE_POLLS = 3
PAUSE_S = 0.005
BUDGET_S = 2.0
_TASKS = "/proc/self/task"

_registered = False


def thread_states(name: str, tasks: str = _TASKS) -> list[str]:
    """The scheduler state letter (``R``, ``S``, ``D``...) of every thread of this process named ``name``."""
    states = []
    try:
        tids = os.listdir(tasks)
    except OSError:
        return states
    for tid in tids:
        try:
            with open(os.path.join(tasks, tid, "stat")) as fh:
                stat = fh.read()
        except OSError:  # the thread ended between the listing and the read
            continue
        open_paren, close_paren = stat.find("("), stat.rfind(")")
        if stat[open_paren + 1 : close_paren] == name:
            states.append(stat[close_paren + 2 : close_paren + 3])
    return states


def all_asleep(states: Iterable[str]) -> bool:
    """True when no thread is running, runnable or in an uninterruptible wait (an empty set is asleep)."""
    return all(s == "S" for s in states)


def drain(
    *,
    states: Callable[[], list[str]] = lambda: thread_states(GLOO_WORKER),
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    settle_polls: int = SETTLE_POLLS,
    pause_s: float = PAUSE_S,
    budget_s: float = BUDGET_S,
) -> bool:
    """Sleep (GIL released) until ``states()`` reads all asleep ``settle_polls`` times in a row; False
    when ``budget_s`` ran out first. No gloo workers at all: True without sleeping."""
    if not states():
        return True
    deadline = clock() + budget_s
    quiet = 0
    while quiet < settle_polls:
        if clock() >= deadline:
            return False
        sleep(pause_s)
        quiet = quiet + 1 if all_asleep(states()) else 0
    return True


def _drain_at_exit() -> None:
    if not drain():
        log.warning(
            "gloo worker threads were still busy %.1fs into interpreter exit; the process may abort in "
            "torch's ProcessGroupGloo teardown (pytorch issue 190489)", BUDGET_S,
        )


def register() -> None:
    """Install the exit drain once per process (called when a process group forms)."""
    global _registered
    if not _registered:
        atexit.register(_drain_at_exit)
        _registered = True
