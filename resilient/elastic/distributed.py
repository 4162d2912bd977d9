"""Process-group lifetime for one generation: init, teardown (aborting NCCL first) and failure triage.

Three ways to form the group, chosen by the runtime's ``rendezvous`` attribute:

* ``"agent"`` (under ``resilient-run``): the agent of group rank 0 hosts a ``TCPStore`` at
  MASTER_ADDR:MASTER_PORT for its whole life; workers connect as clients (one connection per process,
  reused across generations) and each generation uses ``PrefixStore("resilient/gen<g>", client)``, so keys
  of a dead generation never collide with the new one.
* ``"env"`` (plain torchrun): ``init_method="env://"``.
* ``"single"`` (``python train.py``): world size 1 over an in-process ``HashStore``.

Teardown never waits for a collective timeout: NCCL communicators are aborted (``ProcessGroup.abort``)
before ``destroy_process_group``.
"""

from __future__ import annotations

import re
from datetime import timedelta

import torch
import torch.distributed as dist

from resilient import logs
from resilient.errors import GenerationChangedError
from resilient.runtime.api import WorkerAssignment

log = logs.get_logger(__name__)

_client_stores: dict[tuple[str, int], dist.TCPStore] = {}
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


def init(
    assignment: WorkerAssignment,
    *,
    rendezvous: str,
    backend: str,
    device: torch.device,
    timeout: timedelta,
) -> None:
    """Form the default process group for ``assignment``."""
    if dist.is_initialized():
        teardown(abort=True)
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
    dist.init_process_group(store=store, rank=assignment.rank, world_size=assignment.world_size, **kwargs)


def teardown(*, abort: bool) -> None:
    """Destroy the default process group; with ``abort`` first abort its communicators (NCCL)."""
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
