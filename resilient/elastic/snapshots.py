"""Moving captured state in and out of this worker's shared-memory segment.

``SnapshotWriter`` lives as long as the worker process (across in-process recoveries): it holds the
mapping of the segment the runtime gave it, copies a capture into the inactive slot and seals it (the
only time the training thread blocks), then tells the runtime, which replicates and commits without
blocking the caller. When the state grows past the segment (optimizer state appears after the first
step, a user value grows), it asks the runtime for a bigger segment and says so in the log.

``load_snapshot`` reads the committed snapshot named by the runtime's ``RestoreSource``, verified; a
sliced snapshot (``dedup=True``: each rank wrote only its slice of the data-parallel state) is put back
together from every slice of the step (``RestoreSource.slices``, see ``resilient.elastic.dedup``).

With CUDA state and a CUDA-enabled native store the copy overlaps training: ``write`` only queues the
device-to-host copy (``Segment.write_async``) and returns. Every ``guard``-ed optimizer's step (a step
pre-hook) is then ordered after the copy on the GPU (or seals it when the copy is already done), without
blocking the thread; ``poll`` at each step boundary seals and reports the snapshot once the copy is done,
and ``finish`` (next snapshot, restore, end) waits for it. Tensors an optimizer step mutates are copied
in place; other CUDA tensors (module buffers, GradScaler state...) are cloned first on the compute
stream. The stall reported is the launch time plus the time ``finish``/``poll`` actually blocked.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch

from resilient import events, logs
from resilient.elastic import dedup
from resilient.elastic.capture import Captured, load_meta
from resilient.errors import GenerationChangedError, StateError, StoreError, StoreSpaceError, WriteStoppedError
from resilient.runtime.api import OverwriteAnswer, RestoreSource, WorkerRuntime
from resilient.store import PendingWrite, Segment, StopWhen
from resilient.store.layout import ALIGN, align

log = logs.get_logger(__name__)

SEGMENT_HEADROOM_BYTES = 64 << 10  # extra slot bytes asked for whenever a segment is (re)created
COMMIT_POLL_S = 0.005  # poll interval while the final snapshot waits for its commit


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


def keep_for(segment: Segment, view: int | None, ask: Callable[[], OverwriteAnswer]) -> OverwriteAnswer:
    """The step a write into ``segment`` must keep, given ``view``, a possibly lagging view of the committed
    step: the view itself, unless the slot the write would go over holds a sealed step newer than it;
    then the owner's answer (``ask()``: ``WorkerRuntime.before_overwrite``), which may say to skip.
    ``SnapshotWriter.keep_step`` explains why."""
    target = segment.slots()[segment.target_slot(view)]
    if not target.sealed or (view is not None and target.step <= view):
        return OverwriteAnswer(view)
    answer = ask()
    if answer.skip:
        return answer
    if answer.committed is not None and (view is None or answer.committed > view):
        return OverwriteAnswer(answer.committed)
    return OverwriteAnswer(view)


class SnapshotWriter:
    """Writes captures into the runtime's segment for this worker (see the module docstring);
    ``overlap=False`` keeps every copy synchronous."""

    def __init__(self, runtime: WorkerRuntime, *, overlap: bool = True, dedup: bool = False) -> None:
        self._runtime = runtime
        self.dedup = dedup  # data-parallel deduplication: write only this rank's slice (``resilient.elastic.dedup``)
        self._segment: Segment | None = None
        self._layout: dict[str, tuple[torch.dtype, tuple[int, ...]]] | None = None
        self.last_stall_s: float | None = None
        self._inflight: _InFlight | None = None  # the overlapped snapshot not sealed yet
        self._guarded: weakref.WeakSet = weakref.WeakSet()  # optimizers whose step() waits for it
        self._overlap: bool | None = None if overlap else False  # Segment.overlap_available(), asked once
        self.cadence = None  # the step loop's SnapshotCadence, kept across in-process recoveries

    @property
    def segment(self) -> Segment | None:
        return self._segment

    def _segment_for(self, nbytes: int, meta_nbytes: int = 0) -> Segment:
        current = self._segment
        if current is None or current.capacity < nbytes:
            # a new or larger segment: ask for headroom, so that the pickled meta growing by a few bytes (a
            # longer generation number, a grown user value) does not force a new segment at the next snapshot
            nbytes = nbytes + max(SEGMENT_HEADROOM_BYTES, meta_nbytes)
        name = self._runtime.segment_for(nbytes)
        if current is None or current.name != name or current.capacity < nbytes:
            # a different segment, or the runtime recreated this one larger under the same name (the mapping
            # held here is then of the old file): map the runtime's segment afresh
            if self._segment is not None:
                log.info(
                    "snapshot state of %d bytes outgrew segment %s (%d bytes per slot); now writing into segment %s",
                    nbytes, self._segment.name, self._segment.capacity, name,
                )
                self._segment.close()
            self._segment = Segment.open(name)
        return self._segment

    def keep_step(self) -> OverwriteAnswer:
        """The committed step whose local copy the next write must not overwrite (``committed`` None:
        nothing to keep), or ``skip``: write nothing this time.

        A segment has two slots. The next write goes to the slot not sealed last, unless that slot holds the
        committed step: then it replaces the newest, uncommitted snapshot instead (``Segment.write``), so
        this host always keeps its copy of the committed step and a snapshot never waits for a commit. The
        runtime's cheap view of the committed step may lag: when the slot the write would go to holds a
        step newer than that view (either slot: the newest snapshot, or the older one, committed since),
        the owner is asked first (``before_overwrite``), because that step may be the committed one already
        (found by the chaos scenario partition-host: the view said 16, the slots held 17, just committed and
        the only copy, and 18, and the snapshot of 20 went over 17) or about to be: the owner answers and
        stops counting the copy the write goes over in the same critical section as its commits. A slot
        holding a step at or below the view needs no question: commits only move forward.
        """
        self.finish()
        segment = self._segment
        committed = self._runtime.committed_step()
        if segment is None:
            return OverwriteAnswer(committed)
        return keep_for(segment, committed, lambda: self._runtime.before_overwrite(segment.name))

    def wait_committed(self, step: int, timeout: float, beat: Callable[[], None] | None = None,
                       cancelled: Callable[[], bool] | None = None) -> bool:
        """Wait up to ``timeout`` seconds until ``step`` (or a newer one) is committed, asking the owner
        (``poll_committed``) and calling ``beat`` meanwhile (the worker is alive, only waiting for its peers'
        copies); gives up at once when ``cancelled()`` (a new generation was announced: this generation's
        snapshots are fenced off and will never commit). Used for the final snapshot only: periodic ones
        never wait."""
        self.finish()
        deadline = time.monotonic() + timeout
        while True:
            committed = self._runtime.poll_committed()
            if committed is not None and committed >= step:
                return True
            if time.monotonic() >= deadline or (cancelled is not None and cancelled()):
                return False
            if beat is not None:
                beat()
            time.sleep(COMMIT_POLL_S)

    def write(self, captured: Captured, *, step: int, generation: int, stoppable: bool = False) -> float | None:
        """Copy ``captured`` into the segment and seal it as ``step``; returns the blocking time in seconds,
        or None when the runtime said to skip this snapshot (``keep_step``). With the copy overlapped (see
        the module docstring) it returns once the copy is queued, and the snapshot is sealed and reported
        by ``finish``.

        ``stoppable``: when a member of ``generation`` fails while the CPU copy runs (the runtime's
        ``failure_address``), the copy ends part-way and ``GenerationChangedError`` is raised (event
        ``snapshot.stopped``): that snapshot can never commit, and the recovery (the next process group
        needs every rank, so the whole job) would otherwise wait for the rest of the copy."""
        self.finish()
        began = time.perf_counter()
        if self.dedup:
            captured = dedup.split(captured)
        nbytes = required_capacity(captured)
        layout = captured.layout()
        if self._layout is not None and layout != self._layout:
            self._log_layout_change(self._layout, layout, step)
        segment = self._segment_for(nbytes, len(captured.meta))
        if segment.capacity < nbytes:
            raise StateError(
                f"The runtime gave segment {segment.name!r} of {segment.capacity} bytes per slot for a snapshot of "
                f"{nbytes} bytes (step {step}); the runtime must honour segment_for(nbytes)."
            )
        answer = self.keep_step()
        if answer.skip:
            log.warning("snapshot of step %d not written: %s; the previous snapshots stay", step, answer.reason)
            events.emit("snapshot.skipped", step=step, reason=answer.reason)
            return None
        keep = answer.committed
        overlapped = self._overlap_tensors(captured)
        stop = self._stop_when(generation) if stoppable else None
        try:
            try:
                pending = self._store(segment, captured, overlapped, step, generation, keep, stop)
            except StoreSpaceError as exc:
                log.warning(
                    "snapshot of step %d does not fit segment %s (%s); asking for a bigger one", step, segment.name, exc
                )
                segment = self._segment_for(nbytes + nbytes // 4 + (1 << 20))
                pending = self._store(segment, captured, overlapped, step, generation, keep, stop)
        except WriteStoppedError as exc:
            seconds = time.perf_counter() - began
            log.info("snapshot of step %d stopped after %.3fs: a member of generation %d failed", step, seconds,
                     generation)
            events.emit("snapshot.stopped", step=step, gen=generation, seconds=round(seconds, 6))
            raise GenerationChangedError(
                f"Generation {generation} is over (a member failed) during the snapshot of step {step}; recovering."
            ) from exc
        stall = time.perf_counter() - began
        self._layout = layout
        if pending is not None and not pending.sealed:
            self._inflight = _InFlight(pending, nbytes, stall)
            return stall
        self.last_stall_s = stall
        self._runtime.sealed(step, generation, nbytes, stall_s=stall)
        events.emit("snapshot.sealed", step=step, stall_s=round(stall, 6), bytes=nbytes)
        return stall

    def _stop_when(self, generation: int) -> StopWhen | None:
        address = self._runtime.failure_address()
        return None if address is None else StopWhen(address, above=generation - 1)

    @staticmethod
    def _store(segment: Segment, captured: Captured, overlapped: dict[str, torch.Tensor] | None, step: int,
               generation: int, keep: int | None, stop: StopWhen | None) -> PendingWrite | None:
        if overlapped is None:
            segment.write(captured.tensors, step=step, generation=generation, meta=captured.meta, keep_step=keep,
                          stop=stop)
            segment.seal()
            return None
        return segment.write_async(overlapped, step=step, generation=generation, meta=captured.meta, keep_step=keep,
                                   stop=stop)

    def _overlap_tensors(self, captured: Captured) -> dict[str, torch.Tensor] | None:
        """The tensors to write with the copy overlapped (unguarded CUDA tensors cloned), or None: write
        synchronously (no CUDA tensor, no CUDA-enabled native store, or no GPU memory for the clones)."""
        if not any(t.device.type == "cuda" for t in captured.tensors.values()):
            return None
        if self._overlap is None:
            self._overlap = Segment.overlap_available()
        if not self._overlap:
            return None
        guarded = self._guarded_storages()
        out = {}
        try:
            for key, t in captured.tensors.items():
                if t.device.type == "cuda" and t.numel() and t.untyped_storage().data_ptr() not in guarded:
                    t = t.clone()  # nothing stops the next step from changing it in place: copy a private clone
                out[key] = t
        except torch.cuda.OutOfMemoryError as exc:
            log.warning("no GPU memory to clone unguarded state for an overlapped snapshot (%s); copying synchronously",
                        str(exc).splitlines()[0])
            return None
        return out

    def _guarded_storages(self) -> set[int]:
        """Storage addresses of every parameter and state tensor of the guarded optimizers."""
        out: set[int] = set()
        for optimizer in list(self._guarded):
            for group in optimizer.param_groups:
                out.update(p.untyped_storage().data_ptr() for p in group["params"])
            for state in optimizer.state.values():
                out.update(v.untyped_storage().data_ptr() for v in state.values() if isinstance(v, torch.Tensor))
        return out

    def guard(self, optimizer: torch.optim.Optimizer) -> None:
        """Make ``optimizer.step()`` first wait for the overlapped snapshot in flight (a step pre-hook), so
        that its parameters and state are copied in place rather than cloned. Idempotent."""
        if optimizer in self._guarded:
            return
        optimizer.register_step_pre_hook(self._before_step)
        self._guarded.add(optimizer)

    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        flight = self._inflight
        if flight is None:
            return
        if flight.pending.done():
            self.finish()
        else:  # the step's kernels wait for the copy on the GPU; this thread goes on (``poll``/``finish`` seal)
            flight.pending.stream_wait()

    def copy_done(self) -> bool:
        """True when no overlapped copy is in flight or it has finished (``poll`` then seals without waiting)."""
        flight = self._inflight
        return flight is None or flight.pending.done()

    def poll(self) -> float | None:
        """Seal and report the overlapped snapshot if its copy has finished (never blocks on the copy)."""
        flight = self._inflight
        if flight is not None and flight.pending.done():
            return self.finish()
        return None

    def finish(self) -> float | None:
        """Wait for the overlapped snapshot in flight (if any), seal it and tell the runtime; returns its
        stall (launch time + the time this call blocked), None when nothing was in flight."""
        flight = self._inflight
        if flight is None:
            return None
        self._inflight = None
        began = time.perf_counter()
        info = flight.pending.wait()
        stall = flight.launch_s + (time.perf_counter() - began)
        self.last_stall_s = stall
        self._runtime.sealed(info.step, info.generation, flight.nbytes, stall_s=stall)
        events.emit("snapshot.sealed", step=info.step, stall_s=round(stall, 6), bytes=flight.nbytes)
        return stall

    @property
    def in_flight(self) -> bool:
        """Whether an overlapped snapshot is still unsealed (``finish`` seals it)."""
        return self._inflight is not None

    def _log_layout_change(self, old: dict, new: dict, step: int) -> None:
        added = sorted(set(new) - set(old))
        removed = sorted(set(old) - set(new))
        resized = sorted(k for k in set(old) & set(new) if old[k] != new[k])
        log.info(
            "protected state changed shape at step %d (added %s, removed %s, resized %s); the segment grows if needed",
            step, added[:5] + (["..."] if len(added) > 5 else []), removed[:5], resized[:5],
        )

    def close(self) -> None:
        try:
            self.finish()
        except StoreError as exc:
            log.warning("the overlapped snapshot in flight could not be sealed at close: %s", exc)
        if self._segment is not None:
            self._segment.close()
            self._segment = None


@dataclass
class _InFlight:
    pending: PendingWrite
    nbytes: int
    launch_s: float


def load_snapshot(source: RestoreSource, writer: SnapshotWriter | None = None,
                  into: Mapping[str, torch.Tensor] | None = None) -> LoadedSnapshot:
    """Read and verify the committed snapshot ``source`` names (CPU tensors + unpickled meta).

    ``into`` (stored name -> live tensor, e.g. a module's parameters): read straight into those where they
    fit (``Segment.read``); every other tensor comes back freshly allocated."""
    began = time.perf_counter()
    if writer is not None:
        writer.finish()  # the restore writes into the tensors an overlapped copy may still read
    own = writer is not None and writer.segment is not None and writer.segment.name == source.segment
    segment = writer.segment if own else Segment.open(source.segment)
    try:
        snap = segment.read(step=source.step, verify=True, into=into)
    finally:
        if not own:
            segment.close()
    meta = load_meta(snap.meta)
    if meta.get("step") != source.step:
        raise StateError(
            f"Segment {source.segment!r} slot for step {source.step} carries meta of step {meta.get('step')}; the "
            f"snapshot is inconsistent."
        )
    tensors = snap.tensors
    if dedup.is_sliced(meta):  # a data-parallel deduplicated snapshot: put the whole back from every slice
        slices = source.slices or ((source.segment,) if meta[dedup.META_KEY]["world_size"] == 1 else ())
        tensors = dedup.assemble(meta, tensors, slices, step=snap.step, generation=snap.generation,
                                 own_segment=writer.segment if writer is not None else None, into=into)
    return LoadedSnapshot(
        step=snap.step,
        generation=snap.generation,
        meta=meta,
        tensors=tensors,
        seconds=time.perf_counter() - began,
        verified=True,
    )
