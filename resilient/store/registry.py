"""Where segments live and who owns them: paths under the shm directory, listing, stale reclaim.

A segment file is ``<shm_dir>/resilient-<name>``; ``shm_dir`` is the argument, else
``RESILIENT_SHM_DIR``, else ``/dev/shm``. Its owner is the creating process, recorded in the header
as (pid, start time in clock ticks) so a recycled pid is not mistaken for the owner.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from resilient import env
from resilient.errors import StoreError
from resilient.logs import get_logger
from resilient.store.layout import HEADER, Header

PREFIX = "resilient-"
DEFAULT_SHM_DIR = "/dev/shm"
_log = get_logger(__name__)


def resolve_shm_dir(explicit: str | None = None) -> str:
    return explicit or env.get(env.SHM_DIR, DEFAULT_SHM_DIR) or DEFAULT_SHM_DIR


def check_name(name: str) -> str:
    """The bare segment name (a ``resilient-`` prefix is accepted and removed)."""
    if name.startswith(PREFIX):
        name = name[len(PREFIX) :]
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise StoreError(f"Segment name {name!r} is invalid: use a non-empty name without '/'.")
    return name


def segment_path(name: str, directory: str | None = None) -> str:
    return os.path.join(resolve_shm_dir(directory), PREFIX + check_name(name))


def process_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/<pid>/stat), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[19])


def owner_alive(pid: int, start_ticks: int) -> bool:
    if pid <= 0:
        return False
    current = process_start_ticks(pid)
    if current is None:
        return False
    return start_ticks == 0 or current == start_ticks


@dataclass(frozen=True)
class SegmentInfo:
    """A segment found in the shm directory."""

    name: str
    path: str
    job: str
    rank: int
    capacity: int
    size_bytes: int
    owner_pid: int
    owner_alive: bool


def _read_info(path: str) -> SegmentInfo | None:
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
        size = os.path.getsize(path)
    except OSError as exc:
        _log.debug("skipping %s: %s", path, exc)
        return None
    try:
        header = Header.unpack(head, path)
    except ValueError:
        return None  # another resilient file (not a segment) or a segment still being created
    return SegmentInfo(
        name=os.path.basename(path)[len(PREFIX) :],
        path=path,
        job=header.job,
        rank=header.rank,
        capacity=header.capacity,
        size_bytes=size,
        owner_pid=header.owner_pid,
        owner_alive=owner_alive(header.owner_pid, header.owner_start),
    )


def list_segments(job: str | None = None, shm_dir: str | None = None) -> list[SegmentInfo]:
    """Segments in the shm directory (of ``job`` only, when given), sorted by name."""
    directory = resolve_shm_dir(shm_dir)
    try:
        names = sorted(n for n in os.listdir(directory) if n.startswith(PREFIX))
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        info = _read_info(os.path.join(directory, n))
        if info is not None and (job is None or info.job == job):
            out.append(info)
    return out


def reclaim_stale(job: str | None = None, shm_dir: str | None = None) -> list[str]:
    """Remove segments whose owner process is gone; returns the names removed."""
    removed = []
    for info in list_segments(job, shm_dir):
        if info.owner_alive:
            continue
        try:
            os.unlink(info.path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StoreError(f"Cannot remove stale segment {info.path} (owner pid {info.owner_pid} is gone): {exc}.") from exc
        _log.info("reclaimed stale segment %s (job %s rank %s, owner pid %s gone)", info.name, info.job, info.rank, info.owner_pid)
        removed.append(info.name)
    return removed
