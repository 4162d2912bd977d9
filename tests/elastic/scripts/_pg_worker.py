"""Shared by the process-group worker scripts: an agent-style assignment over a test's TCPStore, and the
recovery they all end with (tear the group down, form generation 1 alone over the same store, all-reduce)."""

import sys
import time
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from resilient.elastic import distributed
from resilient.runtime.api import WorkerAssignment

CPU = torch.device("cpu")
TIMEOUT = timedelta(seconds=60)


def assignment(port: int, generation: int, rank: int, world_size: int) -> WorkerAssignment:
    return WorkerAssignment(generation, rank, rank, world_size, world_size, 0, "127.0.0.1", port, generation, "t", "n")


def init(port: int, generation: int, rank: int, world_size: int) -> None:
    distributed.init(assignment(port, generation, rank, world_size), rendezvous="agent", backend="gloo", device=CPU,
                     timeout=TIMEOUT)


def reform_alone(port: int) -> None:
    """After a collective failure: generation 1 with rank 0 alone, over the same store connection."""
    distributed.teardown(abort=True)
    init(port, 1, 0, 1)
    x = torch.full((4,), 2.0)
    dist.all_reduce(x)
    assert dist.get_world_size() == 1 and x.tolist() == [2.0] * 4


def seconds_until_collective_failure(step: Callable[[int], None], steps: int) -> float:
    """Run ``step(0)``, ``step(1)``, ... and return how long the one that failed took; exits 3 when none
    fails, 4 when the failure is not a collective failure."""
    began = time.monotonic()
    try:
        for i in range(steps):
            began = time.monotonic()
            step(i)
    except Exception as exc:  # noqa: BLE001 - the test prints what it caught
        elapsed = time.monotonic() - began
        if not distributed.is_collective_failure(exc):
            print(f"NOT A COLLECTIVE FAILURE: {type(exc).__name__}: {exc}", flush=True)
            sys.exit(4)
        return elapsed
    print("NO FAILURE", flush=True)
    sys.exit(3)
