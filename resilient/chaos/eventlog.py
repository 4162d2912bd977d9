"""Reading a run's JSON-lines event files: incremental tailing while it runs, the merged history after.

Every process of a run appends to a file under ``<run>/events/`` (one per host, plus ``chaos.jsonl`` for
the harness's own ``fault.fired``/``fault.healed``). All processes share one machine, so ``mono``
(CLOCK_MONOTONIC) orders events across files. Each event read here gets ``_src``: the file's stem (the
host name, or ``chaos``), which names the host even for events whose ``node`` field is unset.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

Event = dict[str, Any]


class EventTail:
    """Yields only the complete lines appended since the previous ``poll`` (a torn last line waits)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._offsets: dict[str, int] = {}
        self._partial: dict[str, bytes] = {}

    def poll(self) -> list[Event]:
        out: list[Event] = []
        if not self.directory.is_dir():
            return out
        for path in sorted(self.directory.glob("*.jsonl")):
            key = str(path)
            offset = self._offsets.get(key, 0)
            try:
                with open(path, "rb") as fh:
                    fh.seek(offset)
                    data = fh.read()
            except FileNotFoundError:
                continue
            if not data:
                continue
            self._offsets[key] = offset + len(data)
            buf = self._partial.pop(key, b"") + data
            lines = buf.split(b"\n")
            if lines[-1]:
                self._partial[key] = lines[-1]
            out.extend(_decode(lines[:-1], path.stem))
        out.sort(key=lambda e: e.get("mono", 0.0))
        return out


def _decode(lines: Iterable[bytes], src: str) -> list[Event]:
    out = []
    for raw in lines:
        raw = raw.strip()
        if not raw:
            continue
        try:
            ev = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # a line torn by a killed writer
        if isinstance(ev, dict):
            ev["_src"] = src
            out.append(ev)
    return out


def read_dir(directory: str | Path) -> list[Event]:
    """Every event of a run, merged and ordered by monotonic time."""
    out: list[Event] = []
    d = Path(directory)
    if d.is_dir():
        for path in sorted(d.glob("*.jsonl")):
            with open(path, "rb") as fh:
                out.extend(_decode(fh.read().split(b"\n"), path.stem))
    out.sort(key=lambda e: e.get("mono", 0.0))
    return out


def write(path: str | Path, events: Iterable[Event]) -> None:
    """Write events as JSON lines (used by tests to build recorded streams)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for ev in events:
            fh.write(json.dumps({k: v for k, v in ev.items() if k != "_src"}) + "\n")


def host_of(ev: Event) -> str | None:
    """The host an event came from: its ``node`` field, else its file's stem."""
    node = ev.get("node")
    if isinstance(node, str) and node not in ("-", ""):
        return node
    src = ev.get("_src")
    return src if src and src != "chaos" else None


def matches(ev: Event, kind: str, where: dict[str, Any] | None = None, host: str | None = None) -> bool:
    """True when ``ev`` has that kind, its fields match ``where`` (``fields_match``), and comes from ``host``."""
    if ev.get("kind") != kind:
        return False
    if host is not None and host_of(ev) != host:
        return False
    return fields_match(ev, where)


def fields_match(ev: Event, where: dict[str, Any] | None) -> bool:
    """Every ``where`` field equal as strings; a value ending in ``*`` matches as a prefix."""
    for key, want in (where or {}).items():
        got, want = str(ev.get(key)), str(want)
        if want.endswith("*") and got.startswith(want[:-1]):
            continue
        if got != want:
            return False
    return True
