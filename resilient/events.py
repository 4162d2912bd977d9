"""Machine-readable events: one JSON object per line, a stream separate from the logs.

Every process (agent, worker, chaos runner) appends to the file named by ``--event-log`` /
``RESILIENT_EVENT_LOG``. Each event carries wall time (``ts``), monotonic time (``mono``), who emitted
it (job, node, rank, pid) and a ``kind`` such as ``worker.exit``, ``rdzv.closed``, ``snapshot.sealed``,
``ckpt.committed``, ``restore.done``, ``fault.fired``. The chaos harness and metrics read this stream.

Appends use ``O_APPEND`` with one ``write`` per line, so several processes can share one file.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from resilient import env, logs

_lock = threading.Lock()
_fd: int | None = None
_path: str | None = None


def open_log(path: str | None) -> None:
    """Direct this process's events to ``path`` (None: to ``$RESILIENT_EVENT_LOG`` if set, else nowhere)."""
    global _fd, _path
    with _lock:
        if _fd is not None:
            os.close(_fd)
            _fd = None
        _path = path
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            _fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


def path() -> str | None:
    return _path


def emit(kind: str, **fields: Any) -> dict[str, Any]:
    """Append one event; returns it (also when no log is open, for callers that forward it)."""
    global _fd
    ident = logs.identity()
    event: dict[str, Any] = {
        "ts": time.time(),
        "mono": time.monotonic(),
        "kind": kind,
        "job": ident["job"],
        "node": ident["node"],
        "rank": ident["rank"],
        "gen": ident["gen"],
        "pid": os.getpid(),
    }
    event.update(fields)
    if _fd is None and _path is None:
        env_path = env.get(env.EVENT_LOG)
        if env_path:
            open_log(env_path)
    if _fd is not None:
        line = (json.dumps(event, default=str, separators=(",", ":")) + "\n").encode()
        with _lock:
            if _fd is not None:
                os.write(_fd, line)
    return event


def read(path: str) -> list[dict[str, Any]]:
    """All events in a log file (torn last lines from a killed writer are skipped)."""
    out: list[dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        return []
    return out
