"""The job's etcd history, read back at the end of a run: every put and delete under the job's prefix
since revision 1, in revision order (the run's etcd is never compacted).

Events say what the processes *believe* happened; this says what etcd *accepted*. The checkers use it
for "one assignment per generation" (each ``gen/<g>`` written exactly once, ranks disjoint and complete)
and "no stale write accepted" (no fenced write of generation g at a revision after generation g' > g
was created). ``read`` replays a watch from revision 1 and stops at a sentinel key it writes outside the
job's prefix, so it knows it has seen everything up to the end of the run.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from resilient.config import EtcdSettings
from resilient.etcd.api import WatchEvent
from resilient.etcd.client import EtcdKV
from resilient.errors import ChaosError, EtcdError
from resilient.keys import ROOT, JobKeys


@dataclass(frozen=True)
class Change:
    """One accepted change under the job prefix: ``key`` is relative to it (``gen/000000000001``)."""

    rev: int
    type: str  # put | delete
    key: str
    value: str

    def json(self) -> dict[str, Any]:
        return asdict(self)


def read(settings: EtcdSettings, job: str, timeout: float = 15.0) -> list[Change]:
    """Every change under ``/resilient/<job>/`` from revision 1 to now; raises ChaosError on failure."""
    keys = JobKeys(job)
    sentinel = f"{ROOT}/~chaos-end/{job}"
    got: list[WatchEvent] = []
    end = threading.Event()
    stop_rev: list[int] = []

    def on_event(ev: WatchEvent) -> None:
        if ev.key == sentinel:
            stop_rev.append(ev.mod_revision)
            end.set()
            return
        if ev.key.startswith(keys.prefix):
            got.append(ev)

    try:
        kv = EtcdKV.connect(settings)
    except EtcdError as exc:
        raise ChaosError(f"Cannot connect to the run's etcd at {list(settings.endpoints)} to read its history: "
                         f"{exc}.") from exc
    try:
        handle = kv.watch_prefix(f"{ROOT}/", on_event, start_revision=0)
        try:
            kv.put(sentinel, b"end")
            if not end.wait(timeout):
                raise ChaosError(f"The replay of the run's etcd history did not reach its end within {timeout:.0f}s "
                                 f"({len(got)} changes seen).")
        finally:
            handle.cancel()
    except EtcdError as exc:
        raise ChaosError(f"Reading the run's etcd history failed: {exc}.") from exc
    finally:
        kv.close()
    out = []
    for ev in sorted(got, key=lambda e: e.mod_revision):
        value = bytes(ev.value or b"").decode("utf-8", errors="replace")
        out.append(Change(rev=ev.mod_revision, type=ev.type, key=ev.key[len(keys.prefix):], value=value))
    return out


def write(path: Path, history: list[Change]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for c in history:
            fh.write(json.dumps(c.json()) + "\n")


def load(path: Path) -> list[Change]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            out.append(Change(**json.loads(line)))
    return out


def wait_readable(settings: EtcdSettings, deadline_s: float) -> None:
    """Poll until the etcd answers (a healed member may still be electing); raises ChaosError at the deadline."""
    end = time.monotonic() + deadline_s
    last: Exception | None = None
    while time.monotonic() < end:
        try:
            kv = EtcdKV.connect(settings)
            try:
                kv.revision()
                return
            finally:
                kv.close()
        except EtcdError as exc:
            last = exc
            time.sleep(0.2)
    raise ChaosError(f"The run's etcd did not answer within {deadline_s:.0f}s: {last}.")
