"""``AgentRuntime``: the worker runtime under ``resilient-run`` (see ``resilient.runtime.api``).

Cheap calls go through the shared-memory control block (``control.py``): progress beats, the pending
generation check and the stop request are plain memory reads and writes at every step boundary; a watcher
thread sleeps on a futex of the control block's target generation and runs the ``watch_generation``
callback the moment the agent announces a newer one. Everything
else is a gRPC call to the local agent over its Unix socket (``proto/resilient/v1/worker.proto``):
registration, segments, seals (non-blocking), long-polls for the next generation and restore plans.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

import grpc

from resilient import env, logs
from resilient._proto import worker_pb2, worker_pb2_grpc
from resilient.errors import ConfigError, RendezvousClosedError, RendezvousTimeoutError, ReplicationError, ResilientError
from resilient.runtime.api import OverwriteAnswer, RestoreSource, WorkerAssignment, WorkerRuntime
from resilient.runtime.control import ControlBlock

log = logs.get_logger(__name__)

POLL_S = 10.0  # one WaitGeneration long-poll
WATCH_RECHECK_S = 1.0  # the generation watcher looks again at least this often, woken or not
RPC_TIMEOUT_S = 60.0


def _assignment(m: worker_pb2.Assignment) -> WorkerAssignment:
    return WorkerAssignment(
        generation=m.generation, rank=m.rank, local_rank=m.local_rank, world_size=m.world_size,
        local_world_size=m.local_world_size, group_rank=m.group_rank, master_addr=m.master_addr,
        master_port=m.master_port, restart_count=m.restart_count, job_id=m.job_id, node_id=m.node_id,
    )


class AgentRuntime(WorkerRuntime):
    """See base class."""

    mode = "agent"
    rendezvous = "agent"
    keeps_snapshots = True

    def __init__(self, socket_path: str, control_file: str, slot: int, *, import_s: float = 0.0) -> None:
        self._slot = slot
        self._lock = threading.Lock()
        self._control = ControlBlock.open(control_file)
        self._channel = grpc.insecure_channel(f"unix:{socket_path}")
        self._stub = worker_pb2_grpc.WorkerAgentStub(self._channel)
        self._pending_seals: list[grpc.Future] = []
        self._recovering = False
        self._watcher: threading.Thread | None = None
        self._closing = threading.Event()
        try:
            reply = self._stub.Register(
                worker_pb2.RegisterRequest(local_rank=slot, pid=os.getpid(), import_s=import_s),
                timeout=RPC_TIMEOUT_S, wait_for_ready=True,
            )
        except grpc.RpcError as exc:
            raise ResilientError(
                f"could not register with the resilient-run agent at {socket_path}: {exc.details()}"
            ) from exc
        self._assignment = _assignment(reply.assignment)
        self._control.set("worker_pid", os.getpid())
        self._control.set("generation", self._assignment.generation)
        self._control.set_state("running")

    @classmethod
    def from_env(cls) -> "AgentRuntime":
        socket_path = env.get(env.AGENT_SOCKET)
        control_file = env.get(env.CONTROL_FILE)
        slot = env.get_int(env.LOCAL_RANK)
        if not socket_path or not control_file or slot is None:
            raise ConfigError(
                f"{env.AGENT_SOCKET}, {env.CONTROL_FILE} and {env.LOCAL_RANK} must all be set under resilient-run; "
                "was this process started by resilient-run?"
            )
        return cls(socket_path, control_file, slot)

    def _call(self, method, request, what: str):
        try:
            return method(request, timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise ResilientError(f"{what} failed: the agent answered {exc.code().name}: {exc.details()}") from exc

    # --- generations ----------------------------------------------------------------------------------
    def assignment(self) -> WorkerAssignment:
        with self._lock:
            return self._assignment

    def wait_for_generation(self, after: int, timeout: float) -> WorkerAssignment:
        deadline = time.monotonic() + timeout
        self._control.set_state("recovering")
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RendezvousTimeoutError(
                    f"no generation after {after} formed within {timeout:g}s (rank {self._assignment.rank})."
                )
            reply = self._call(
                self._stub.WaitGeneration,
                worker_pb2.WaitRequest(local_rank=self._slot, after=after, timeout_s=min(POLL_S, left)),
                "waiting for the next generation",
            )
            if reply.status == worker_pb2.WaitReply.OK:
                a = _assignment(reply.assignment)
                with self._lock:
                    self._assignment = a
                self._control.set("generation", a.generation)
                # stays "recovering" (no hang clock) through process-group set-up and restore: the next beat,
                # at the top of the step loop, switches it back to "running"
                self._recovering = True
                return a
            if reply.status == worker_pb2.WaitReply.CLOSED:
                raise RendezvousClosedError(f"The job ended while waiting for a new generation: {reply.detail}")
            if reply.status == worker_pb2.WaitReply.NOT_MEMBER:
                raise RendezvousClosedError(f"This worker has no rank in the new generation: {reply.detail}")

    def pending_generation(self) -> bool:
        return self._control.get("target_generation") > self._assignment.generation

    def failure_address(self) -> int | None:
        return self._control.failed_address()

    def watch_generation(self, callback: Callable[[int], None]) -> None:
        if self._watcher is not None:
            raise RuntimeError("watch_generation was called twice; one watcher per runtime")
        self._watcher = threading.Thread(target=self._watch, args=(callback,), name="resilient-gen-watch",
                                         daemon=True)
        self._watcher.start()

    def _watch(self, callback: Callable[[int], None]) -> None:
        seen = None  # the target the callback last looked at
        while not self._closing.is_set():
            target = self._control.get("target_generation") if seen is None else \
                self._control.wait_target(seen, WATCH_RECHECK_S)
            if target != seen and target > self.assignment().generation:
                try:
                    callback(target)
                except Exception:  # noqa: BLE001 - a watcher that dies would leave the worker to the timeouts
                    log.exception("the generation watcher's callback failed for generation %d", target)
            seen = target

    def should_stop(self) -> bool:
        return self._control.get("stop_requested") != 0

    def beat(self, step: int) -> None:
        self._control.beat(step)
        if self._recovering:
            self._recovering = False
            self._control.set_state("running")

    # --- snapshots ------------------------------------------------------------------------------------
    def segment_for(self, nbytes: int) -> str:
        reply = self._call(self._stub.SegmentFor, worker_pb2.SegmentRequest(local_rank=self._slot, nbytes=nbytes),
                           f"asking the agent for a {nbytes}-byte segment")
        return reply.segment

    def sealed(self, step: int, generation: int, nbytes: int, stall_s: float | None = None) -> None:
        fut = self._stub.Sealed.future(
            worker_pb2.SealedRequest(local_rank=self._slot, step=step, generation=generation, nbytes=nbytes,
                                     stall_s=-1.0 if stall_s is None else stall_s),
            timeout=RPC_TIMEOUT_S,
        )
        with self._lock:
            self._pending_seals = [f for f in self._pending_seals if not f.done()]
            self._pending_seals.append(fut)

    def restore_source(self) -> RestoreSource | None:
        r = self._call(self._stub.RestorePlan, worker_pb2.RestoreRequest(local_rank=self._slot),
                       "asking the agent for a restore plan")
        if r.error:
            raise ReplicationError(f"The agent cannot restore this worker's committed state ({r.error}); refusing to "
                                   "start from scratch, which would lose committed steps.")
        if not r.has_source:
            return None
        return RestoreSource(step=r.step, generation=r.generation, segment=r.segment, source_rank=r.source_rank,
                             origin=r.origin, world_size=r.world_size, slices=tuple(r.slices))

    def committed_step(self) -> int | None:
        step = self._control.get("committed_step")
        return None if step < 0 else step

    def poll_committed(self) -> int | None:
        """Ask the agent (its commit view is newer than the control block, refreshed every monitor interval)."""
        reply = self._call(self._stub.Committed, worker_pb2.CommittedRequest(local_rank=self._slot),
                           "asking the agent for the committed step")
        return None if reply.step < 0 else reply.step

    def before_overwrite(self, segment: str) -> OverwriteAnswer:
        reply = self._call(self._stub.Committed,
                           worker_pb2.CommittedRequest(local_rank=self._slot, overwrite_segment=segment),
                           "asking the agent before overwriting an uncommitted snapshot")
        return OverwriteAnswer(None if reply.step < 0 else reply.step, reply.skip, reply.reason)

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until the seals sent so far reached the agent (used before a clean exit)."""
        with self._lock:
            pending, self._pending_seals = self._pending_seals, []
        for fut in pending:
            try:
                fut.result(timeout=timeout)
            except grpc.RpcError as exc:
                log.warning("a snapshot seal did not reach the agent: %s", exc.details())
            except grpc.FutureTimeoutError:
                log.warning("a snapshot seal did not reach the agent within %.0fs", timeout)

    def close(self) -> None:
        self.flush()
        self._control.set_state("done")
        self._closing.set()
        if self._watcher is not None:
            self._control.wake_target()
            self._watcher.join(WATCH_RECHECK_S + 1.0)
        self._channel.close()
        self._control.close()
