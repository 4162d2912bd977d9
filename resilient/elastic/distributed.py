"""Process-group lifetime for one generation: init, teardown (aborting NCCL first) and failure triage.

Three ways to form the group, chosen by the runtime's ``rendezvous`` attribute:

* ``"agent"`` (under ``resilient-run``): the agent of group rank 0 hosts a ``TCPStore`` at
  MASTER_ADDR:MASTER_PORT for its whole life; workers connect as clients (one connection per process,
  reused across generations) and each generation uses ``PrefixStore("resilient/gen<g>", client)``, so keys
  of a dead generation never collide with the new one.
* ``"env"`` (plain torchrun): ``init_method="env://"``.
* ``"single"`` (``python train.py``): world size 1 over an in-process ``HashStore``.

Under the agent the ranks first gather on the generation's store (``_gather``: an arrival counter and a
flag the last arrival sets) while each checks whether its generation was superseded: a rank that died
before joining (a replacement crashing as it starts) would otherwise keep its peers inside
``init_process_group`` for the whole group timeout (300 s) after the agent had formed the next
generation, and the next generation would then wait for them as long.

Teardown never waits for a collective timeout: NCCL communicators are aborted (``ProcessGroup.abort``)
before ``destroy_process_group``. A gloo group under the agent keeps its TCP connections on the side
(``groupsockets``): ``abort_collectives``, called by the runtime's generation watcher when the agent
announces a newer generation, shuts them down, so a collective blocked on a peer that is gone but not yet
closed fails at once instead of at the group timeout.
"""

from __future__ import annotations

import re
import time
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from resilient import events, logs
from resilient.elastic import exitdrain
from resilient.elastic.groupsockets import GroupSockets, open_sockets
from resilient.errors import GenerationChangedError
from resilient.runtime.api import WorkerAssignment

log = logs.get_logger(__name__)

_client_stores: dict[tuple[str, int], dist.TCPStore] = {}
_group_sockets = GroupSockets()
_COLLECTIVE_FAILURE = re.compile(
    r"gloo|nccl|connection (closed|reset|refused)|broken pipe|peer|socket|timed out|timeout|"
    r"aborted|process group|ProcessGroup|communicator|Read error|Write error",
    re.IGNORECASE,
)


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _client_store(addr: str, port: int, timeout: timedelta) -> dist.TCPStore:
    key = (addr, port)
    store = _client_stores.get(key)
    if store is None:
        store = dist.TCPStore(addr, port, is_master=False, timeout=timeout)
        _client_stores.clear()  # the store host moved: drop connections to the old one
        _client_stores[key] = store
    return store


ARRIVED_KEY = "resilient/arrived"
ALL_ARRIVED_KEY = "resilient/all-arrived"
GATHER_POLL_MAX_S = 0.05  # the longest pause between two looks at the flag (and at the generation)


def _gather(store: dist.Store, assignment: WorkerAssignment, timeout: timedelta,
            superseded: Callable[[], bool], clock: Callable[[], float] = time.monotonic,
            sleep: Callable[[float], None] = time.sleep) -> None:
    """Wait until every rank of the generation reached its store; GenerationChangedError as soon as
    ``superseded()`` (a newer generation was announced: someone will never arrive), RuntimeError after
    ``timeout``. Polls the flag with ``check`` (no blocking store call to cancel), backing off from 2 ms."""
    if store.add(ARRIVED_KEY, 1) >= assignment.world_size:
        store.set(ALL_ARRIVED_KEY, b"1")
        return
    deadline = clock() + timeout.total_seconds()
    pause = 0.002
    while not store.check([ALL_ARRIVED_KEY]):
        if superseded():
            arrived = store.add(ARRIVED_KEY, 0)
            raise GenerationChangedError(
                f"generation {assignment.generation} was superseded while its ranks gathered ({arrived} of "
                f"{assignment.world_size} arrived); joining the next one"
            )
        if clock() >= deadline:
            raise RuntimeError(
                f"timed out after {timeout.total_seconds():.0f}s waiting for the ranks of generation "
                f"{assignment.generation} ({store.add(ARRIVED_KEY, 0)} of {assignment.world_size} arrived)"
            )
        sleep(pause)
        pause = min(pause * 1.5, GATHER_POLL_MAX_S)


def init(
    assignment: WorkerAssignment,
    *,
    rendezvous: str,
    backend: str,
    device: torch.device,
    timeout: timedelta,
    superseded: Callable[[], bool] | None = None,
) -> None:
    """Form the default process group for ``assignment``; under the agent the ranks gather first and give
    up as soon as ``superseded()`` says a newer generation was announced (see the module docstring)."""
    if dist.is_initialized():
        teardown(abort=True)
    exitdrain.register()  # gloo's workers must let go of Python before the interpreter finalizes
    kwargs: dict = {"backend": backend, "timeout": timeout}
    if backend == "nccl" and device.type == "cuda":
        kwargs["device_id"] = device
    if rendezvous == "env":
        dist.init_process_group(init_method="env://", **kwargs)
        return
    if rendezvous == "single":
        if assignment.world_size != 1:
            raise ValueError(f"single-process rendezvous needs world size 1, got {assignment.world_size}")
        store: dist.Store = dist.HashStore()
    else:
        client = _client_store(assignment.master_addr, assignment.master_port, timeout)
        store = dist.PrefixStore(f"resilient/gen{assignment.generation}", client)
        if superseded is not None:
            _gather(store, assignment, timeout, superseded)
    before = open_sockets() if backend == "gloo" and rendezvous == "agent" else None
    dist.init_process_group(store=store, rank=assignment.rank, world_size=assignment.world_size, **kwargs)
    if before is not None:
        n = _group_sockets.capture(assignment.generation, before)
        log.debug("generation %d: %d gloo connections kept for abort_collectives", assignment.generation, n)
        if superseded is not None and superseded():
            # announced while the group formed: the watcher's call came before there was anything to abort
            abort_collectives(assignment.generation + 1)


def abort_collectives(target_generation: int) -> int:
    """Fail the collectives of the current group, in flight or to come, if it belongs to a generation before
    ``target_generation`` (safe from any thread); the number of connections shut down (0: nothing to do)."""
    gen = _group_sockets.generation
    n = _group_sockets.abort(target_generation)
    if n:
        events.emit("collectives.abort", aborted_gen=gen, target=target_generation, connections=n)
        log.warning("generation %s is over (generation %d announced): %d gloo connections shut down, so its "
                    "collectives fail now", gen, target_generation, n)
    return n


def teardown(*, abort: bool) -> None:
    """Destroy the default process group; with ``abort`` first abort its communicators (NCCL)."""
    _group_sockets.release()
    if not dist.is_initialized():
        return
    if abort:
        pg = dist.group.WORLD
        backend = dist.get_backend(pg)
        if backend == "nccl" and pg is not None:
            try:
                pg.abort()
            except RuntimeError as exc:
                log.warning("aborting the NCCL process group failed (%s); destroying it anyway", exc)
    try:
        dist.destroy_process_group()
    except (RuntimeError, ValueError) as exc:
        log.warning("destroying the process group failed (%s); continuing with a new one", exc)


def is_collective_failure(exc: BaseException) -> bool:
    """True for the errors a failed peer or a changed membership produce inside collectives."""
    if isinstance(exc, GenerationChangedError):
        return True
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and bool(_COLLECTIVE_FAILURE.search(str(exc)))


def close_stores() -> None:
    _client_stores.clear()
