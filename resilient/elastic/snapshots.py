"""Moving captured state in and out of this worker's shared-memory segment.

``SnapshotWriter`` lives as long as the worker process (across in-process recoveries): it holds the
mapping of the segment the runtime gave it, copies a capture into the inactive slot and seals it (the
only time the training thread blocks), then tells the runtime, which replicates and commits without
blocking the caller. When the state grows past the segment (optimizer state appears after the first
step, a user value grows), it asks the runtime for a bigger segment and says so in the log.

``load_snapshot`` reads the committed snapshot named by the runtime's ``RestoreSource``, verified.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from resilient import events, logs
from resilient.elastic.capture import Captured, load_meta
from resilient.errors import StateError, StoreSpaceError
from resilient.runtime.api import RestoreSource, WorkerRuntime
from resilient.store import Segment
from resilient.store.layout import ALIGN, align

log = logs.get_logger(__name__)


def required_capacity(captured: Captured) -> int:
    """Slot bytes the store needs for ``captured`` (tensors aligned as the store lays them out, then meta)."""
    off = 0
    for t in captured.tensors.values():
        off = align(off, ALIGN) + t.numel() * t.element_size()
    return align(off, ALIGN) + len(captured.meta)


@dataclass
class LoadedSnapshot:
    step: int
    generation: int
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    seconds: float
    verified: bool


class SnapshotWriter:
    """Writes captures into the runtime's segment for this worker (see the module docstring)."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self._runtime = runtime
        self._segment: Segment | None = None
        self._layout: dict[str, tuple[torch.dtype, tuple[int, ...]]] | None = None
        self.last_stall_s: float | None = None

    @property
    def segment(self) -> Segment | None:
        return self._segment

    def _segment_for(self, nbytes: int) -> Segment:
        name = self._runtime.segment_for(nbytes)
        if self._segment is None or self._segment.name != name:
            if self._segment is not None:
                log.info(
                    "snapshot state of %d bytes outgrew segment %s (%d bytes per slot); now writing into segment %s",
                    nbytes, self._segment.name, self._segment.capacity, name,
                )
                self._segment.close()
            self._segment = Segment.open(name)
        return self._segment

    def overwrites_committed(self) -> bool:
        """True when the next write would destroy the only local copy of the committed step.

        A segment has two slots and a write goes to the one not sealed last. When the newest sealed step is
        not committed yet, the other slot may still hold the committed step: overwriting it would leave this
        host with no committed copy until the newer step commits. Such a snapshot is skipped instead.
        """
        segment = self._segment
        latest = None if segment is None else segment.latest()
        if latest is None:
            return False
        committed = self._runtime.committed_step()
        if committed is None or committed >= latest.step:
            return False
        target = next(info for info in segment.slots() if info.slot != latest.slot)
        return target.sealed and target.step == committed

    def wait_until_safe(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the pending commit that makes the next write safe."""
        deadline = time.monotonic() + timeout
        while self.overwrites_committed():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def write(self, captured: Captured, *, step: int, generation: int) -> float:
        """Copy ``captured`` into the segment and seal it as ``step``; returns the blocking time in seconds."""
        began = time.perf_counter()
        nbytes = required_capacity(captured)
        layout = captured.layout()
        if self._layout is not None and layout != self._layout:
            self._log_layout_change(self._layout, layout, step)
        segment = self._segment_for(nbytes)
        if segment.capacity < nbytes:
            raise StateError(
                f"The runtime gave segment {segment.name!r} of {segment.capacity} bytes per slot for a snapshot of "
                f"{nbytes} bytes (step {step}); the runtime must honour segment_for(nbytes)."
            )
        try:
            segment.write(captured.tensors, step=step, generation=generation, meta=captured.meta)
        except StoreSpaceError as exc:
            log.warning(
                "snapshot of step %d does not fit segment %s (%s); asking for a bigger one", step, segment.name, exc
            )
            segment = self._segment_for(nbytes + nbytes // 4 + (1 << 20))
            segment.write(captured.tensors, step=step, generation=generation, meta=captured.meta)
        segment.seal()
        stall = time.perf_counter() - began
        self._layout = layout
        self.last_stall_s = stall
        self._runtime.sealed(step, generation, nbytes)
        events.emit("snapshot.sealed", step=step, stall_s=round(stall, 6), bytes=nbytes)
        return stall

    def _log_layout_change(self, old: dict, new: dict, step: int) -> None:
        added = sorted(set(new) - set(old))
        removed = sorted(set(old) - set(new))
        resized = sorted(k for k in set(old) & set(new) if old[k] != new[k])
        log.info(
            "protected state changed shape at step %d (added %s, removed %s, resized %s); the segment grows if needed",
            step, added[:5] + (["..."] if len(added) > 5 else []), removed[:5], resized[:5],
        )

    def close(self) -> None:
        if self._segment is not None:
            self._segment.close()
            self._segment = None


def load_snapshot(source: RestoreSource, writer: SnapshotWriter | None = None) -> LoadedSnapshot:
    """Read and verify the committed snapshot ``source`` names (fresh CPU tensors + unpickled meta)."""
    began = time.perf_counter()
    own = writer is not None and writer.segment is not None and writer.segment.name == source.segment
    segment = writer.segment if own else Segment.open(source.segment)
    try:
        snap = segment.read(step=source.step, verify=True)
    finally:
        if not own:
            segment.close()
    meta = load_meta(snap.meta)
    if meta.get("step") != source.step:
        raise StateError(
            f"Segment {source.segment!r} slot for step {source.step} carries meta of step {meta.get('step')}; the "
            f"snapshot is inconsistent."
        )
    return LoadedSnapshot(
        step=snap.step,
        generation=snap.generation,
        meta=meta,
        tensors=snap.tensors,
        seconds=time.perf_counter() - began,
        verified=True,
    )
