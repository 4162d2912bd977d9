"""``Context``: what the user's train function sees for one generation.

One ``Context`` per call of the train function (a recovery builds a new one). It carries the worker's
place in the generation (rank, world size, device...), registers protected objects and restores them
from the committed snapshot, drives the step loop (``steps``: progress beats, ``step.done`` events,
periodic snapshots, generation checks) and takes snapshots.

Restore happens in two places, on purpose:

* ``protect`` loads the state of each protected object (modules first, so shape errors come before
  anything changes) and ``ctx.state``;
* the first ``steps()`` call puts back the RNG states and sampler positions, and fires the
  ``on_world_change`` hooks: RNG state must be what the next step reads, so code that runs between
  ``protect`` and the loop (and may draw random numbers) does not disturb it.

After the body of step ``s`` completes, the state is "after step s"; a snapshot then holds ``s + 1``
completed steps and ``restored_step`` after a recovery is that count.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from resilient import events, logs
from resilient.data import ElasticSampler
from resilient.elastic import capture as cap
from resilient.elastic import rng, skipinit
from resilient.elastic.cadence import SnapshotCadence
from resilient.elastic.snapshots import LoadedSnapshot, SnapshotWriter, load_snapshot
from resilient.errors import GenerationChangedError, StateError
from resilient.runtime.api import WorkerAssignment, WorkerRuntime

log = logs.get_logger(__name__)

STATE_NAME = "_state"  # ctx.state in the snapshot
RNG_PREFIX = "_rng"


@dataclass
class Recovery:
    """How this incarnation came to be (filled by the decorator after a failure)."""

    reason: str
    began: float  # time.monotonic() at recover.begin
    phases: dict[str, float] = field(default_factory=dict)


class Context:
    """The train function's handle on the runtime. See the module docstring."""

    def __init__(
        self,
        *,
        runtime: WorkerRuntime,
        assignment: WorkerAssignment,
        device: torch.device,
        writer: SnapshotWriter,
        snapshot_every: int,
        seed: int,
        recovery: Recovery | None = None,
        commit_wait_s: float = 0.0,
    ) -> None:
        self._runtime = runtime
        self._commit_wait_s = commit_wait_s  # how long the final snapshot waits for its commit
        self._assignment = assignment
        self.device = device
        self._writer = writer
        writer.finish()  # an overlapped snapshot of the previous incarnation: sealed before anything changes
        self._snapshot_every = snapshot_every
        if writer.cadence is None or writer.cadence.every != snapshot_every:
            writer.cadence = SnapshotCadence(snapshot_every)  # kept across in-process recoveries, like the writer
        self._cadence = writer.cadence
        self._cadence.new_generation()
        self.seed = seed
        self._recovery = recovery
        self._source = runtime.restore_source()
        self._loaded: LoadedSnapshot | None = None
        self._objects: dict[str, Any] = {}
        self._kinds: dict[str, str] = {}
        self._state: dict[str, Any] = {}
        self._state_restored = False
        self._hooks: list[Callable[[int, int], None]] = []
        self._started = False
        self._loop_open = False  # a ctx.steps() generator is between its first and its last step
        self._warned_total = False  # the "steps(total) is a total" warning, once per Context
        self._stopped = False  # the loop ended early on a stop request (preemption)
        self._completed = 0 if self._source is None else self._source.step
        self._last_snapshot: int | None = None if self._source is None else self._source.step

    # --- who and where ------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self._assignment.rank

    @property
    def local_rank(self) -> int:
        return self._assignment.local_rank

    @property
    def world_size(self) -> int:
        return self._assignment.world_size

    @property
    def local_world_size(self) -> int:
        return self._assignment.local_world_size

    @property
    def generation(self) -> int:
        return self._assignment.generation

    @property
    def restart_count(self) -> int:
        return self._assignment.restart_count

    @property
    def assignment(self) -> WorkerAssignment:
        return self._assignment

    @property
    def runtime(self) -> WorkerRuntime:
        """The worker runtime (LocalRuntime, AgentRuntime...), for advanced use and tests."""
        return self._runtime

    @property
    def restored_step(self) -> int | None:
        """Steps completed in the snapshot this incarnation restored from; None on a fresh start."""
        return None if self._source is None else self._source.step

    @property
    def completed_steps(self) -> int:
        return self._completed

    @property
    def world_changed(self) -> bool:
        """True when the restored snapshot was taken with another world size."""
        return self._source is not None and self._source.world_size != self.world_size

    # --- protected state ----------------------------------------------------------------------------
    @property
    def state(self) -> dict[str, Any]:
        """Plain picklable values kept in every snapshot (restored before the first access)."""
        if not self._state_restored:
            self._state_restored = True
            loaded = self._load()
            if loaded is not None and STATE_NAME in loaded.meta["objects"]:
                entry = loaded.meta["objects"][STATE_NAME]
                self._state.update(cap.restore_object(STATE_NAME, {}, entry, loaded.tensors))
        return self._state

    def protect(self, **objects: Any) -> dict[str, Any]:
        """Register objects whose state every snapshot holds, and restore them from the committed snapshot.

        Objects with ``state_dict``/``load_state_dict`` (modules, optimizers, schedulers, GradScaler,
        samplers, user objects) are restored in place; plain values (numbers, strings, tensors, arrays and
        containers of them) go into ``ctx.state``. Returns ``{name: object or restored value}``.

        Protect everything before the first ``ctx.steps()``: after the loop began it raises ``StateError``
        (snapshots already taken lack the object, and a recovery, which re-runs the function with a new
        Context, would find the restored snapshot without it).
        """
        if self._started:
            names = ", ".join(f"{n}=..." for n in objects)
            raise StateError(
                f"ctx.protect({names}) was called after the step loop began (at step {self._completed}): snapshots "
                "taken so far do not hold it, and a recovery could not restore it. Protect every object before "
                "the first ctx.steps() (one ctx.protect(...) call with all of them, or several before the loop)."
            )
        kinds: dict[str, str] = {}
        for name, obj in objects.items():
            if name.startswith("_"):
                raise StateError(f"ctx.protect({name}=...): names starting with '_' are reserved for resilient.")
            kinds[name] = cap.kind_of(name, obj)
        # the first load reads module state straight into the live parameters and buffers (no second copy)
        first_load = self._source is not None and self._loaded is None
        loaded = self._load(into=cap.live_module_tensors(objects, kinds) if first_load else None)
        state = self.state
        out: dict[str, Any] = {}
        for name in cap.restore_order(objects, kinds):
            obj = objects[name]
            if loaded is not None:
                entry = self._entry(loaded, name, kinds[name])
                if entry is not None:
                    obj = cap.restore_object(name, obj, entry, loaded.tensors)
            if kinds[name] == "value":
                if loaded is None or name not in state:
                    state[name] = obj
                out[name] = state[name]
                continue
            if isinstance(obj, ElasticSampler):
                obj.set_world(self.rank, self.world_size)
            if kinds[name] == "optimizer":
                self._writer.guard(obj)  # its step() waits for an overlapped snapshot copy still in flight
            self._objects[name], self._kinds[name] = obj, kinds[name]
            out[name] = obj
        return out

    def _entry(self, loaded: LoadedSnapshot, name: str, kind: str) -> dict[str, Any] | None:
        if kind == "value":
            return None  # plain values come back through ctx.state
        entries = loaded.meta["objects"]
        if name not in entries:
            held = sorted(n for n in entries if not n.startswith("_"))
            raise StateError(
                f"Cannot restore {name}: the snapshot of step {loaded.step} holds no object of that name (it holds "
                f"{held}); protect the same names as the run that took it."
            )
        return entries[name]

    def _load(self, into: dict[str, torch.Tensor] | None = None) -> LoadedSnapshot | None:
        """The committed snapshot, read on first use (``into``: live tensors to read straight into)."""
        if self._source is None:
            return None
        if self._loaded is None:  # before the loop only: protect() refuses to run once it began
            self._loaded = load_snapshot(self._source, self._writer, into=into)
            events.emit(
                "restore.done",
                step=self._loaded.step,
                origin=self._source.origin,
                verified=self._loaded.verified,
                seconds=round(self._loaded.seconds, 6),
            )
            log.info(
                "restored step %d from %s (rank %d's shard, world size %d) in %.3f s",
                self._loaded.step, self._source.origin, self._source.source_rank, self._source.world_size,
                self._loaded.seconds,
            )
        return self._loaded

    def skip_init(self) -> "contextlib.AbstractContextManager[None]":
        """On a restore, modules built inside this block skip their random initialisation (the snapshot
        overwrites it in ``protect``); on a fresh start it does nothing. See ``resilient.elastic.skipinit``."""
        return skipinit.skip_init(self.restored_step is not None)

    # --- hooks ------------------------------------------------------------------------------------------
    def on_world_change(self, callback: Callable[[int, int], None]) -> None:
        """Call ``callback(old_world_size, new_world_size)`` when the restored state came from another world
        size (at the start of ``steps()``, after every protected object was restored): rescale the learning
        rate or batch there."""
        self._hooks.append(callback)

    # --- the step loop ----------------------------------------------------------------------------------
    def should_stop(self) -> bool:
        """True when the node is being preempted: finish the step; ``steps()`` snapshots and ends."""
        return self._runtime.should_stop()

    def steps(self, total: int) -> Iterator[int]:
        """Yield step indices from the number of completed steps up to ``total`` (exclusive).

        ``total`` is the run's total number of steps, not a count per call: the step counter is the job's,
        so a second ``ctx.steps(total)`` continues where the first loop ended (and yields nothing when
        ``total`` steps are done; it logs a warning then, once). For epochs, iterate
        ``ctx.steps(epochs * steps_per_epoch)`` once and derive the epoch from the step. One loop at a time:
        starting a second while an earlier one is suspended mid-loop raises ``StateError``."""
        if self._loop_open:
            raise StateError(
                f"ctx.steps({total}) started while an earlier ctx.steps() loop is still open (suspended at step "
                f"{self._completed}); both would count the same steps. Finish or close() the earlier one first, "
                "or iterate a single ctx.steps(total) loop."
            )
        later = self._started
        self._begin()
        if later and self._completed >= total and not self._warned_total:
            self._warned_total = True
            log.warning(
                "ctx.steps(%d) yields nothing: %d steps are already completed. total is the run's total number of "
                "steps, not a count per call (a second ctx.steps() continues where the first loop ended); for "
                "epochs, iterate ctx.steps(epochs * steps_per_epoch) once and derive the epoch from the step.",
                total, self._completed,
            )
        self._runtime.beat(self._completed - 1)  # alive: restore and set-up are over
        self._loop_open = True
        try:
            for step in range(self._completed, total):
                if self._runtime.pending_generation():
                    raise GenerationChangedError(
                        f"Generation {self.generation} is over (a newer one was announced) before step {step}; "
                        "recovering."
                    )
                if self._runtime.should_stop():
                    log.info("stop requested before step %d: taking a final snapshot and ending the loop", step)
                    self._stopped = True
                    self._final_snapshot()
                    return
                logs.set_identity(step=step)
                yield step
                self._completed = step + 1
                self._runtime.beat(step)
                self._writer.poll()  # seal an overlapped snapshot whose copy has finished (never blocks)
                events.emit("step.done", step=step, gen=self.generation, world_size=self.world_size)
                self._periodic_snapshot()
        finally:
            self._loop_open = False

    def _begin(self) -> None:
        if self._started:
            return
        _ = self.state
        loaded = self._load()
        self._started = True
        step = self._completed
        if loaded is not None:
            if self.world_changed or self._source.source_rank != self.rank:
                used = rng.reseed(self.seed, step, self.rank, self.device)
                log.info(
                    "state came from rank %d of a world of %d: seeded this rank's RNGs from "
                    "(seed %d, step %d, rank %d) = %d",
                    self._source.source_rank, self._source.world_size, self.seed, step, self.rank, used,
                )
            else:
                rng_tensors = {k: v for k, v in loaded.tensors.items() if k.startswith(RNG_PREFIX + "/")}
                own = {k[len(RNG_PREFIX) + 1 :]: v for k, v in rng_tensors.items()}
                rng.restore(own, loaded.meta["rng"], self.device)
        for obj in self._objects.values():
            if isinstance(obj, ElasticSampler):
                obj.set_world(self.rank, self.world_size)
                obj.set_step(step)
        self._loaded = None  # release the snapshot's memory
        if self._source is not None and self.world_changed:
            for hook in self._hooks:
                hook(self._source.world_size, self.world_size)
        if self._recovery is not None:
            if loaded is not None:
                self._recovery.phases["restore_s"] = loaded.seconds
            seconds = time.monotonic() - self._recovery.began
            events.emit(
                "recover.done",
                gen=self.generation,
                seconds=round(seconds, 6),
                phases={k: round(v, 6) for k, v in self._recovery.phases.items()},
            )
            log.info("recovered into generation %d in %.3f s (%s)", self.generation, seconds, self._recovery.reason)
            self._recovery = None

    # --- snapshots --------------------------------------------------------------------------------------
    def _periodic_snapshot(self) -> None:
        """The step loop's snapshot, on the cadence every rank follows (``resilient.elastic.cadence``): every
        ``snapshot_every`` steps, thinned to a power-of-two stride while replication is behind."""
        cadence = self._cadence
        committed = self._runtime.committed_step()
        cadence.observe(self._completed, committed)
        if not cadence.candidate(self._completed):
            return
        if cadence.pending(committed):
            committed = self._runtime.poll_committed()  # the cheap view may lag: ask the owner before thinning
            cadence.observe(self._completed, committed)
        due = cadence.due(self._completed, committed)
        change = cadence.last_change
        if change is not None:
            log.log(logging.WARNING if change.new == cadence.max_stride else logging.INFO,
                    "snapshot stride %d -> %d (%s): periodic snapshots every %d steps", change.old, change.new,
                    change.reason, change.new * cadence.every)
            events.emit("snapshot.cadence", step=self._completed, stride=change.new, every=cadence.every,
                        reason=change.reason)
        # stoppable: a kill that lands while this copy runs must not make the recovery wait for the rest of it
        if due and self._snapshot(stoppable=True) is not None:
            cadence.took(self._completed)

    def snapshot(self) -> int | None:
        """Snapshot the protected state now (state after ``completed_steps`` steps); returns the step count,
        or None where snapshots are off (plain torchrun) or the runtime had this one skipped.

        Never waits for a commit: the copy goes to the slot that does not hold the committed step (see
        ``SnapshotWriter.keep_step``), so the committed copy survives however far replication lags."""
        return self._snapshot(stoppable=False)

    def _snapshot(self, *, stoppable: bool) -> int | None:
        if not getattr(self._runtime, "keeps_snapshots", True):
            return None
        step = self._completed
        for obj in self._objects.values():
            if isinstance(obj, ElasticSampler):
                obj.set_step(step)
        rng_tensors, rng_plain = rng.capture(self.device)
        captured = cap.capture(
            {**self._objects, STATE_NAME: self.state},
            extra_tensors={f"{RNG_PREFIX}/{k}": v for k, v in rng_tensors.items()},
            extra_meta={
                "rng": rng_plain,
                "step": step,
                "rank": self.rank,
                "world_size": self.world_size,
                "generation": self.generation,
                "seed": self.seed,
            },
        )
        if self._writer.write(captured, step=step, generation=self.generation, stoppable=stoppable) is None:
            return None  # skipped (see ``SnapshotWriter.keep_step``): the final snapshot tries again
        self._last_snapshot = step
        return step

    def _final_snapshot(self) -> None:
        """At the end (or on a stop request): snapshot the last step, then wait up to ``commit_wait_s`` for
        its commit, so that the job ends (or is preempted) with its final state committed."""
        if not (self._objects or self._state) or not getattr(self._runtime, "keeps_snapshots", True):
            return
        if self._last_snapshot != self._completed:
            self.snapshot()
        step = self._completed
        if self._writer.wait_committed(step, self._commit_wait_s, beat=lambda: self._runtime.beat(step - 1),
                                       cancelled=self._runtime.pending_generation):
            return
        log.warning("the final snapshot of step %d was not committed within %.0fs (committed: %s); a restart "
                    "resumes from the committed step", step, self._commit_wait_s, self._runtime.committed_step())
        events.emit("snapshot.uncommitted", step=step, committed=self._runtime.committed_step(),
                    waited_s=self._commit_wait_s)

    def _finish(self) -> dict[str, Any]:
        """After the train function returned: final snapshot, ``train.done`` with the state hash."""
        self._final_snapshot()
        self._writer.finish()  # seal an overlapped snapshot still in flight
        from resilient.elastic.exactness import state_hash

        hashed = {n: o for n, o in self._objects.items() if self._kinds[n] in ("module", "optimizer")}
        digest = state_hash(hashed) if hashed else None
        return events.emit("train.done", step=self._completed, state_hash=digest, stopped=self._stopped)
