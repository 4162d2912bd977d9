"""What a worker process needs from its runtime, written down once.

The decorator (``resilient.elastic``) talks only to a ``WorkerRuntime``. Implementations:

* ``AgentRuntime`` (``resilient.runtime.agent_client``): under ``resilient-run``; talks to the local node
  agent over gRPC on a Unix socket and through a shared-memory control block (``control.py``). The agent
  owns the snapshot segments, replicates them and commits steps.
* ``LocalRuntime`` (``resilient.runtime.local``): ``python train.py`` (one process, world size 1) and plain
  ``torchrun`` (in-memory recovery off): snapshots go to a segment this process owns; a sealed snapshot is
  committed at once.

Generations: a generation is one frozen assignment of ranks. ``pending_generation()`` is a cheap check
(no syscall beyond a shared-memory read) that the step loop makes at every step boundary; when it is
true, or when a collective fails, the decorator tears the process group down and calls
``wait_for_generation``. ``watch_generation`` learns of an announcement at once, from a thread, so that the
decorator can fail collectives blocked on a peer that is gone.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class OverwriteAnswer:
    """The owner's answer before a snapshot write goes over an uncommitted copy (``before_overwrite``):
    the committed step (the write keeps its copy), or ``skip``: write nothing this time (the owner could
    not make sure the copy about to be overwritten is not being committed; the previous snapshots stay)."""

    committed: int | None
    skip: bool = False
    reason: str = ""


@dataclass(frozen=True)
class WorkerAssignment:
    """This worker's place in one generation."""

    generation: int
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    group_rank: int  # index of this node in the generation
    master_addr: str
    master_port: int
    restart_count: int
    job_id: str
    node_id: str


@dataclass(frozen=True)
class RestoreSource:
    """Where this worker restores from: a committed step held in a local segment (the agent fetched it from
    a peer or the durable tier first when it was not local)."""

    step: int
    generation: int  # generation the snapshot was taken in
    segment: str  # name of the local shared-memory segment to read
    source_rank: int  # rank whose shard it is (differs from ours after a world-size change)
    origin: str  # "local" | "peer:<node>" | "peer:<a>+<b>+..." (pulled in stripes from several) | "durable"
    world_size: int  # world size the snapshot was taken with
    # data-parallel deduplicated snapshots only: the local segment holding each rank's slice of the step
    # (index = rank of the world that took it); empty for whole snapshots
    slices: tuple[str, ...] = ()


class WorkerRuntime(abc.ABC):
    @abc.abstractmethod
    def assignment(self) -> WorkerAssignment:
        """The current assignment (from the environment at start, then from wait_for_generation)."""

    @abc.abstractmethod
    def wait_for_generation(self, after: int, timeout: float) -> WorkerAssignment:
        """Block until a generation newer than ``after`` that includes this worker is formed.
        Raises RendezvousClosedError when the job ended or this worker is no longer part of it."""

    @abc.abstractmethod
    def pending_generation(self) -> bool:
        """True when the agent announced a generation newer than the one this worker runs in."""

    def watch_generation(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(target_generation)`` from a background thread as soon as the agent announces a
        generation newer than the one this worker runs in (at every later announcement too). By default
        nothing: a runtime without an agent announces generations only where the worker looks for them."""

    def failure_address(self) -> int | None:
        """The address of an aligned int64, in memory mapped for this runtime's life, holding the newest
        generation a member failed in (no snapshot of it can commit any more): a snapshot copy of generation
        ``g`` stops part-way once it reaches ``g`` instead of delaying the recovery
        (``resilient.store.segment.StopWhen``). By default None: copies always run to their end."""
        return None

    @abc.abstractmethod
    def should_stop(self) -> bool:
        """True when the node is being preempted (SIGTERM to the agent): finish the step, snapshot, return."""

    @abc.abstractmethod
    def beat(self, step: int) -> None:
        """Progress beat (called at every step boundary; a shared-memory write)."""

    @abc.abstractmethod
    def segment_for(self, nbytes: int) -> str:
        """Name of the segment (slot capacity >= nbytes) this worker writes its snapshots into."""

    @abc.abstractmethod
    def sealed(self, step: int, generation: int, nbytes: int, stall_s: float | None = None) -> None:
        """A snapshot of ``step`` was sealed in this worker's segment (non-blocking for the caller).
        ``stall_s``: how long the training thread was blocked by it (reported as a metric)."""

    @abc.abstractmethod
    def restore_source(self) -> RestoreSource | None:
        """The committed snapshot to restore from, or None on a fresh start."""

    @abc.abstractmethod
    def committed_step(self) -> int | None:
        """The newest committed step known (None when none); cheap, may lag the newest commit slightly."""

    def poll_committed(self) -> int | None:
        """The newest committed step, asked of its owner now (used while waiting for a commit); by default
        the same as ``committed_step``."""
        return self.committed_step()

    def before_overwrite(self, segment: str) -> OverwriteAnswer:
        """Called before a snapshot write into ``segment`` goes over a slot holding a step newer than
        ``committed_step()``: the owner answers the committed step and stops counting the copy about to be
        overwritten, in the same critical section as its commits. By default (the runtime commits each
        seal at once, so nothing is in flight) the committed step."""
        return OverwriteAnswer(self.committed_step())

    @abc.abstractmethod
    def close(self) -> None: ...
