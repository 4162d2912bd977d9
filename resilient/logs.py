"""Logs that say who speaks: ``[job/node/rank gen=G step=S] message``.

``get_logger(__name__)`` returns a stdlib logger; ``set_identity`` fills the prefix for the whole process
(the agent sets job/node, a worker adds its rank; generation and step are updated as they change).
"""

from __future__ import annotations

import logging
import os
import sys
import threading

from resilient import env

_identity: dict[str, object] = {"job": "-", "node": "-", "rank": None, "gen": None, "step": None}
_lock = threading.Lock()
_configured = False


def set_identity(**fields: object) -> None:
    """Update who this process is (job, node, rank, gen, step); unknown keys are refused."""
    with _lock:
        for key, value in fields.items():
            if key not in _identity:
                raise KeyError(f"unknown log identity field {key!r}")
            _identity[key] = value


def identity() -> dict[str, object]:
    with _lock:
        return dict(_identity)


def prefix() -> str:
    ident = identity()
    who = f"{ident['job']}/{ident['node']}"
    if ident["rank"] is not None:
        who += f"/{ident['rank']}"
    extra = ""
    if ident["gen"] is not None:
        extra += f" gen={ident['gen']}"
    if ident["step"] is not None:
        extra += f" step={ident['step']}"
    return f"[{who}{extra}]"


class _WhoFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.who = prefix()
        return True


def configure(level: str | int | None = None, stream=None) -> None:
    """Install the one handler on the ``resilient`` logger (idempotent)."""
    global _configured
    root = logging.getLogger("resilient")
    if level is None:
        level = env.get(env.LOG_LEVEL, "INFO")
    root.setLevel(level if isinstance(level, int) else str(level).upper())
    if _configured:
        return
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_WhoFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname).1s %(who)s %(name)s: %(message)s", "%H:%M:%S")
    )
    root.addHandler(handler)
    root.propagate = False
    _configured = True


def get_logger(name: str) -> logging.Logger:
    if not _configured and os.environ.get("PYTEST_CURRENT_TEST") is None:
        configure()
    return logging.getLogger(name if name.startswith("resilient") else f"resilient.{name}")
