"""The ranks of a generation gather on its store before forming the process group, and give up as soon as
the generation is superseded (a rank that will never arrive must not hold its peers for the group
timeout). Real TCPStore, one server and a client per rank, as under the agent."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from resilient.elastic.distributed import ARRIVED_KEY, _gather
from resilient.errors import GenerationChangedError
from resilient.runtime.api import WorkerAssignment
from resilient.testing.etcd import wait_until


@pytest.fixture
def stores():
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))

    def client(generation: int) -> dist.Store:
        c = dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=30))
        return dist.PrefixStore(f"resilient/gen{generation}", c)

    yield client


def assignment(rank: int, world: int, generation: int = 4) -> WorkerAssignment:
    return WorkerAssignment(generation, rank, rank, world, world, 0, "127.0.0.1", 0, generation, "job", "node")


def test_every_rank_returns_once_all_arrived(stores):
    world, errors, done = 3, [], []

    def rank(r: int) -> None:
        try:
            store = stores(4)
            # they arrive one after another: rank r once r others are there
            wait_until(lambda: store.add(ARRIVED_KEY, 0) >= r, 20, f"{r} ranks before rank {r}")
            _gather(store, assignment(r, world), timedelta(seconds=20), superseded=lambda: False)
            done.append(r)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and sorted(done) == [0, 1, 2]
    assert stores(4).add(ARRIVED_KEY, 0) == world


def test_a_superseded_generation_is_left_at_once_instead_of_waiting_for_a_rank_that_never_comes(stores):
    looks = []

    def superseded() -> bool:  # the agent announces the next generation while rank 0 waits
        looks.append(1)
        return len(looks) > 3

    began = time.monotonic()
    with pytest.raises(GenerationChangedError, match=r"generation 4 was superseded .*1 of 2 arrived"):
        _gather(stores(4), assignment(0, 2), timedelta(seconds=300), superseded=superseded)
    assert len(looks) == 4, "it gave up at the first look after the announcement"
    assert time.monotonic() - began < 5.0  # not the 300 s group timeout


def test_generations_do_not_share_arrivals(stores):
    _gather(stores(5), assignment(0, 1, generation=5), timedelta(seconds=5), superseded=lambda: False)
    with pytest.raises(GenerationChangedError):  # generation 6 starts counting from zero
        _gather(stores(6), assignment(0, 2, generation=6), timedelta(seconds=5), superseded=lambda: True)


def test_gives_up_after_the_timeout_with_a_collective_failure(stores):
    from resilient.elastic import distributed

    now = [0.0]
    with pytest.raises(RuntimeError, match=r"timed out after 60s .*generation 4 \(1 of 2 arrived\)") as info:
        _gather(stores(4), assignment(0, 2), timedelta(seconds=60), superseded=lambda: False,
                clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + 7.0))
    assert distributed.is_collective_failure(info.value)  # the decorator recovers from it
