"""In-worker fault hooks: faults that only the worker process itself can produce at a chosen step.

The chaos runner arms them through ``$RESILIENT_CHAOS_INWORKER`` on the target host; a training script
calls ``at_step(step)`` once per step (``chaos/train_chaos.py`` does). Terms are separated by ``;``::

    ID:ACTION:STEP:LOCAL_RANK[:repeat]

Actions: ``segv`` (a real segmentation fault through ctypes), ``raise`` (a Python exception through the
failpoint registry, so a ``failpoint.fired`` event is emitted), ``panic`` (``os._exit(137)``) and
``gil(SECONDS)`` (stuck in C code holding the GIL: ``sleep`` called through ``ctypes.PyDLL``, which does
not release it) and ``sleep(SECONDS)`` (stuck with the GIL released, as in a CUDA synchronisation on a
collective whose peer is gone: the worker's other threads run, its step never ends). A term fires once
per job (a marker file in ``$RESILIENT_CHAOS_DIR`` survives the respawn of the worker) unless it ends in
``:repeat``, which fires every time the step is reached.
Every firing emits ``chaos.inworker`` (id, action, step) before acting.
"""

from __future__ import annotations

import ctypes
import os
import re
import time
from dataclasses import dataclass

from resilient import env, events, failpoints
from resilient.errors import ConfigError

ACTIONS = ("segv", "raise", "panic", "gil", "sleep")
_ACTION = re.compile(r"^(?P<kind>[a-z]+)(?:\((?P<arg>[0-9.]+)\))?$")


@dataclass(frozen=True)
class Term:
    id: str
    action: str
    arg: float | None
    step: int
    local_rank: int
    repeat: bool = False

    def spec(self) -> str:
        act = f"{self.action}({self.arg:g})" if self.arg is not None else self.action
        return f"{self.id}:{act}:{self.step}:{self.local_rank}" + (":repeat" if self.repeat else "")


def parse(spec: str | None) -> list[Term]:
    terms = []
    for raw in (spec or "").split(";"):
        raw = raw.strip()
        if not raw:
            continue
        parts = raw.split(":")
        if len(parts) not in (4, 5) or (len(parts) == 5 and parts[4] != "repeat"):
            raise ConfigError(f"In-worker chaos term {raw!r} is not ID:ACTION:STEP:LOCAL_RANK[:repeat].")
        m = _ACTION.match(parts[1])
        if m is None or m.group("kind") not in ACTIONS:
            raise ConfigError(f"In-worker chaos term {raw!r}: action must be one of {list(ACTIONS)}.")
        try:
            step, local_rank = int(parts[2]), int(parts[3])
        except ValueError as exc:
            raise ConfigError(f"In-worker chaos term {raw!r}: STEP and LOCAL_RANK must be integers.") from exc
        arg = float(m.group("arg")) if m.group("arg") else None
        terms.append(Term(parts[0], m.group("kind"), arg, step, local_rank, len(parts) == 5))
    return terms


_terms: list[Term] | None = None


def _claim(term: Term) -> bool:
    """True exactly once per job for a one-shot term (the marker file outlives a respawned worker)."""
    if term.repeat:
        return True
    directory = os.environ.get(env.CHAOS_DIR)
    if not directory:
        return True
    try:
        fd = os.open(os.path.join(directory, f"fired-{term.id}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def at_step(step: int, local_rank: int | None = None) -> None:
    """Fire the armed terms for this step and this worker (a no-op when nothing is armed)."""
    global _terms
    if _terms is None:
        _terms = parse(os.environ.get(env.CHAOS_INWORKER))
    if not _terms:
        return
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    for term in _terms:
        if term.step != step or term.local_rank != local_rank or not _claim(term):
            continue
        events.emit("chaos.inworker", id=term.id, action=term.action, step=step, local_rank=local_rank)
        _act(term, step)


def _act(term: Term, step: int) -> None:
    if term.action == "segv":
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    elif term.action == "panic":
        os._exit(failpoints.PANIC_EXIT_CODE)
    elif term.action == "raise":
        name = f"chaos.worker.{term.id}"
        failpoints.Registry(f"{name}=raise").hit(name, step=step)
    elif term.action == "gil":
        libc = ctypes.PyDLL(None)  # PyDLL keeps the GIL held during the call
        libc.sleep(ctypes.c_uint(int(term.arg if term.arg is not None else 3600)))
    elif term.action == "sleep":
        time.sleep(term.arg if term.arg is not None else 3600)
