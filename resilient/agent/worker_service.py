"""The worker <-> agent gRPC service (``proto/resilient/v1/worker.proto``) on a Unix-domain socket.

Thin: each call is translated into the ``WorkerHub`` (generations, registration) or the snapshot manager
(segments, seals, restore plans, commits). Requests name a local slot (the worker's LOCAL_RANK at spawn);
an unknown slot is refused with INVALID_ARGUMENT, never crashes the agent.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent import futures
from typing import Callable, Protocol

import grpc

from resilient._proto import worker_pb2, worker_pb2_grpc
from resilient.agent.hub import WorkerHub
from resilient.errors import ReplicationError, ResilientError
from resilient.replication.slices import marker_at
from resilient.logs import get_logger
from resilient.runtime.api import OverwriteAnswer, RestoreSource, WorkerAssignment

log = get_logger(__name__)

MAX_WAIT_S = 30.0
_STATUS = {
    "ok": worker_pb2.WaitReply.OK,
    "timeout": worker_pb2.WaitReply.TIMEOUT,
    "closed": worker_pb2.WaitReply.CLOSED,
    "not_member": worker_pb2.WaitReply.NOT_MEMBER,
}


class Snapshots(Protocol):
    def segment_for(self, rank: int, nbytes: int) -> str: ...

    def on_sealed(self, rank: int, step: int, generation: int, nbytes: int) -> object: ...

    def prepare_restore(self, rank: int) -> RestoreSource | None: ...

    def committed_step(self) -> int | None: ...

    def before_overwrite(self, rank: int, segment: str) -> OverwriteAnswer: ...


def with_local_slices(src: RestoreSource, snapshots: object) -> RestoreSource:
    """``src`` with ``slices`` filled in from a one-node snapshot store (``LocalSnapshots.segments``: every
    rank's segment is on this host) when it names a sliced (deduplicated) snapshot; the ``ShardManager``
    fills them itself (fetching missing slices from peers). Unchanged for whole snapshots."""
    segments = getattr(snapshots, "segments", None)
    if src.slices or segments is None:
        return src
    from resilient.store import Segment

    seg = Segment.open(src.segment)
    try:
        marker = marker_at(seg, src.step, src.generation)
    finally:
        seg.close()
    if marker is None:
        return src
    held = segments()
    missing = [r for r in range(marker.world_size) if r not in held]
    if missing:
        raise ReplicationError(f"step {src.step} was snapshotted in slices across {marker.world_size} ranks (dedup) "
                               f"but this host holds no segment of ranks {missing}; it cannot be put back together.")
    return dataclasses.replace(src, slices=tuple(held[r] for r in range(marker.world_size)))


def assignment_msg(a: WorkerAssignment) -> worker_pb2.Assignment:
    return worker_pb2.Assignment(
        generation=a.generation, rank=a.rank, local_rank=a.local_rank, world_size=a.world_size,
        local_world_size=a.local_world_size, group_rank=a.group_rank, master_addr=a.master_addr,
        master_port=a.master_port, restart_count=a.restart_count, job_id=a.job_id, node_id=a.node_id,
    )


def assignment_from_msg(m: worker_pb2.Assignment) -> WorkerAssignment:
    return WorkerAssignment(
        generation=m.generation, rank=m.rank, local_rank=m.local_rank, world_size=m.world_size,
        local_world_size=m.local_world_size, group_rank=m.group_rank, master_addr=m.master_addr,
        master_port=m.master_port, restart_count=m.restart_count, job_id=m.job_id, node_id=m.node_id,
    )


class WorkerService(worker_pb2_grpc.WorkerAgentServicer):
    def __init__(self, hub: WorkerHub, snapshots: Callable[[], Snapshots],
                 on_register: Callable[[int, int], None] | None = None,
                 on_stall: Callable[[float], None] | None = None) -> None:
        self._hub = hub
        self._snapshots = snapshots
        self._on_register = on_register
        self._on_stall = on_stall

    def _rank(self, slot: int, context: grpc.ServicerContext) -> int:
        a = self._hub.assignment(slot)
        if a is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"local slot {slot} has no rank in the current "
                                                            f"generation {self._hub.generation}")
        return a.rank

    def Register(self, request, context):
        a = self._hub.register(request.local_rank, request.pid, request.import_s)
        if a is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"local slot {request.local_rank} is not assigned")
        if self._on_register is not None:
            self._on_register(request.local_rank, request.pid)
        committed = self._snapshots().committed_step()
        return worker_pb2.RegisterReply(assignment=assignment_msg(a), committed_step=-1 if committed is None
                                        else committed)

    def SegmentFor(self, request, context):
        rank = self._rank(request.local_rank, context)
        if request.nbytes < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"nbytes {request.nbytes} is negative")
        try:
            name = self._snapshots().segment_for(rank, request.nbytes)
        except ResilientError as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        return worker_pb2.SegmentReply(segment=name)

    def Sealed(self, request, context):
        rank = self._rank(request.local_rank, context)
        if request.stall_s >= 0:  # negative: the worker did not measure it
            self._hub.record_stall(request.stall_s)
            if self._on_stall is not None:
                self._on_stall(request.stall_s)
        try:
            self._snapshots().on_sealed(rank, request.step, request.generation, request.nbytes)
        except ResilientError as exc:
            log.warning("rank %d step %d: the sealed snapshot was not taken: %s", rank, request.step, exc)
        return worker_pb2.Ack()

    def WaitGeneration(self, request, context):
        timeout = min(max(request.timeout_s, 0.0), MAX_WAIT_S)
        res = self._hub.wait(request.local_rank, request.after, timeout)
        reply = worker_pb2.WaitReply(status=_STATUS[res.status], detail=res.detail)
        if res.assignment is not None:
            reply.assignment.CopyFrom(assignment_msg(res.assignment))
        return reply

    def RestorePlan(self, request, context):
        rank = self._rank(request.local_rank, context)
        try:
            src = self._snapshots().prepare_restore(rank)
        except ResilientError as exc:
            # Never a silent fresh start when something was committed: the worker fails with the cause.
            log.warning("rank %d: no restore source: %s", rank, exc)
            return worker_pb2.RestoreReply(has_source=False, error=f"{type(exc).__name__}: {exc}")
        if src is None:
            return worker_pb2.RestoreReply(has_source=False)
        try:
            src = with_local_slices(src, self._snapshots())
        except ResilientError as exc:
            log.warning("rank %d: the slices of its deduplicated snapshot cannot be found: %s", rank, exc)
            return worker_pb2.RestoreReply(has_source=False, error=f"{type(exc).__name__}: {exc}")
        return worker_pb2.RestoreReply(has_source=True, step=src.step, generation=src.generation,
                                       segment=src.segment, source_rank=src.source_rank, origin=src.origin,
                                       world_size=src.world_size, slices=list(src.slices))

    def Committed(self, request, context):
        if not request.overwrite_segment:
            step = self._snapshots().committed_step()
            return worker_pb2.CommittedReply(step=-1 if step is None else step)
        rank = self._rank(request.local_rank, context)
        answer = self._snapshots().before_overwrite(rank, request.overwrite_segment)
        return worker_pb2.CommittedReply(step=-1 if answer.committed is None else answer.committed, skip=answer.skip,
                                         reason=answer.reason)


def serve(service: WorkerService, socket_path: str, max_workers: int) -> grpc.Server:
    if os.path.exists(socket_path):
        os.unlink(socket_path)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="worker-svc"))
    worker_pb2_grpc.add_WorkerAgentServicer_to_server(service, server)
    server.add_insecure_port(f"unix:{socket_path}")
    server.start()
    os.chmod(socket_path, 0o600)
    return server
