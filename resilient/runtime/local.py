"""``LocalRuntime``: the worker runtime without an agent (``python train.py`` and plain torchrun).

See ``resilient.runtime.api.WorkerRuntime`` for the contract. Here this process owns its snapshot
segment (created in ``segment_for``, unlinked at ``close``) and a sealed snapshot is committed at once,
so an in-process recovery (``request_generation`` then ``GenerationChangedError`` at the next step
boundary) restores the newest sealed step bit for bit. Nothing outlives the process: a restarted process
starts fresh. Segments left behind by a killed local run (owner process gone) are removed by the next
one.

Modes: ``"single"`` (world size 1, in-process HashStore) and ``"torchrun"`` (rank and world from
torchrun's environment, ``env://`` rendezvous, no snapshots because torchrun restarts every worker from
scratch: in-memory recovery is off).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading

from resilient import env, logs
from resilient.errors import ConfigError, RendezvousClosedError
from resilient.runtime.api import RestoreSource, WorkerAssignment, WorkerRuntime

log = logs.get_logger(__name__)

SEGMENT_PREFIX = "local"


def _headroom(nbytes: int) -> int:
    """Capacity for ``nbytes`` of state: 1/8 more and 1 MiB, so small growth does not re-create it."""
    return nbytes + nbytes // 8 + (1 << 20)


class LocalRuntime(WorkerRuntime):
    """See base class. Thread-safe ``request_generation``/``request_stop`` (callable from signal handlers)."""

    def __init__(
        self,
        *,
        mode: str = "single",
        rank: int = 0,
        local_rank: int = 0,
        world_size: int = 1,
        local_world_size: int = 1,
        master_addr: str = "127.0.0.1",
        master_port: int = 0,
        restart_count: int = 0,
        job_id: str = "local",
        shm_dir: str | None = None,
    ) -> None:
        if mode not in ("single", "torchrun"):
            raise ConfigError(f"LocalRuntime mode must be 'single' or 'torchrun', not {mode!r}.")
        if mode == "single" and world_size != 1:
            raise ConfigError(f"LocalRuntime in single mode runs world size 1, not {world_size}; use resilient-run.")
        if not 0 <= rank < world_size:
            raise ConfigError(f"LocalRuntime: rank {rank} is not in a world of size {world_size}.")
        self.mode = mode
        self.rendezvous = "single" if mode == "single" else "env"
        self.keeps_snapshots = mode == "single"
        self._shm_dir = shm_dir
        self._lock = threading.Lock()
        self._assignment = WorkerAssignment(
            generation=0,
            rank=rank,
            local_rank=local_rank,
            world_size=world_size,
            local_world_size=local_world_size,
            group_rank=0 if mode == "single" else rank // max(1, local_world_size),
            master_addr=master_addr,
            master_port=master_port,
            restart_count=restart_count,
            job_id=job_id,
            node_id=socket.gethostname(),
        )
        self._target_generation = 0
        self._stop = False
        self._last_beat: int | None = None
        self._segment = None  # the creator handle of the current segment
        self._segment_capacity = 0
        self._segment_count = 0
        self._retired: list = []  # older segments, kept until a snapshot seals in the newer one
        self._committed: RestoreSource | None = None
        if self.keeps_snapshots:
            self._remove_stale_segments()

    @classmethod
    def from_torchrun_env(cls) -> "LocalRuntime":
        """Rank and world from torchrun's environment variables."""
        world_size = env.get_int(env.WORLD_SIZE, 1)
        return cls(
            mode="torchrun",
            rank=env.get_int(env.RANK, 0),
            local_rank=env.get_int(env.LOCAL_RANK, 0),
            world_size=world_size,
            local_world_size=env.get_int(env.LOCAL_WORLD_SIZE, world_size),
            master_addr=env.get(env.MASTER_ADDR, "127.0.0.1"),
            master_port=env.get_int(env.MASTER_PORT, 0),
            restart_count=env.get_int(env.RESTART_COUNT, 0),
            job_id=env.get(env.RUN_ID, "torchrun"),
        )

    # --- generations --------------------------------------------------------------------------------
    def assignment(self) -> WorkerAssignment:
        with self._lock:
            return self._assignment

    def request_generation(self) -> None:
        """Announce a new generation (the next step boundary raises GenerationChangedError)."""
        with self._lock:
            self._target_generation = max(self._target_generation, self._assignment.generation) + 1

    def pending_generation(self) -> bool:
        return self._target_generation > self._assignment.generation

    def wait_for_generation(self, after: int, timeout: float) -> WorkerAssignment:
        with self._lock:
            if self.mode == "torchrun":
                raise RendezvousClosedError(
                    "Under plain torchrun resilient cannot form a new generation in-process; torchrun restarts the "
                    "workers (run under resilient-run for in-memory recovery)."
                )
            if self._target_generation <= after:
                raise RendezvousClosedError(
                    f"A single-process run has no peers, so no generation after {after} will form; the error that "
                    f"stopped generation {after} is not a peer failure."
                )
            current = self._assignment
            self._assignment = dataclasses.replace(
                current, generation=self._target_generation, restart_count=current.restart_count + 1
            )
            return self._assignment

    def request_stop(self) -> None:
        self._stop = True

    def should_stop(self) -> bool:
        return self._stop

    def beat(self, step: int) -> None:
        self._last_beat = step

    # --- snapshots ----------------------------------------------------------------------------------
    def segment_for(self, nbytes: int) -> str:
        from resilient.store import Segment

        with self._lock:
            if self._segment is not None and self._segment_capacity >= nbytes:
                return self._segment.name
            capacity = _headroom(nbytes)
            self._segment_count += 1
            name = f"{SEGMENT_PREFIX}-{os.getpid()}-{self._segment_count}"
            segment = Segment.create(
                name, capacity, job=self._assignment.job_id, rank=self._assignment.rank, shm_dir=self._shm_dir
            )
            if self._segment is not None:
                log.info(
                    "snapshot state grew to %d bytes, past segment %s (%d bytes per slot): created segment %s of %d",
                    nbytes, self._segment.name, self._segment_capacity, name, capacity,
                )
                self._retired.append(self._segment)
            self._segment, self._segment_capacity = segment, capacity
            return name

    def sealed(self, step: int, generation: int, nbytes: int, stall_s: float | None = None) -> None:
        with self._lock:
            if self._segment is None:
                raise RendezvousClosedError("LocalRuntime.sealed was called before segment_for; no segment exists.")
            a = self._assignment
            self._committed = RestoreSource(
                step=step,
                generation=generation,
                segment=self._segment.name,
                source_rank=a.rank,
                origin="local",
                world_size=a.world_size,
            )
            retired, self._retired = self._retired, []
        for old in retired:
            old.unlink()
            old.close()

    def restore_source(self) -> RestoreSource | None:
        with self._lock:
            return self._committed

    def committed_step(self) -> int | None:
        with self._lock:
            return None if self._committed is None else self._committed.step

    def close(self) -> None:
        with self._lock:
            segments = [*self._retired, *([self._segment] if self._segment is not None else [])]
            self._retired, self._segment, self._committed = [], None, None
        for segment in segments:
            segment.unlink()
            segment.close()

    def _remove_stale_segments(self) -> None:
        """Unlink this job's segments whose creating process is gone (a killed ``python train.py``)."""
        from resilient.store.registry import reclaim_stale

        reclaim_stale(job=self._assignment.job_id, shm_dir=self._shm_dir)
