"""Reading a generation's worker-store port from its master's node store (real TCPStores on loopback):
found once published, given up as soon as the generation is over (the master may be gone), a clear
error after the timeout."""

from __future__ import annotations

import datetime
import threading
import time

import pytest
import torch.distributed as dist

from resilient.agent.store_host import StoreHost, env_port_key, free_port, generation_env_port
from resilient.errors import RendezvousError


@pytest.fixture
def master():
    host = StoreHost(timeout=30)
    yield host
    host.close()


def test_the_port_is_read_once_the_master_publishes_it(master):
    go, published = threading.Event(), []

    def publish():
        go.wait(10)
        published.append(master.host_generation(7))

    t = threading.Thread(target=publish)
    t.start()
    looks = []

    def ended() -> bool:
        looks.append(1)
        if len(looks) == 2:
            go.set()  # published only after the reader has waited at least once
        return False

    port = generation_env_port("127.0.0.1", master.port, 7, 30, ended=ended, poll=0.05)
    t.join()
    assert published and port == published[0]  # published only after the reader's second look


def test_a_generation_that_ends_before_its_master_publishes_is_given_up(master):  # it never publishes 3
    looks = []

    def ended() -> bool:
        looks.append(1)
        return len(looks) > 3

    assert generation_env_port("127.0.0.1", master.port, 3, 300, ended=ended, poll=0.05) is None
    assert len(looks) == 4


def test_a_master_that_is_gone_is_given_up_when_the_generation_ends():
    port = free_port("127.0.0.1")  # nobody listens: connecting is refused
    looks = []

    def ended() -> bool:
        looks.append(1)
        return len(looks) > 3

    t0 = time.monotonic()
    assert generation_env_port("127.0.0.1", port, 3, 300, ended=ended, poll=0.05) is None
    assert len(looks) == 4
    assert time.monotonic() - t0 < 30  # not the 300 s timeout (nor c10d's long connect retries)


def test_a_master_that_never_publishes_fails_with_a_clear_error(master):
    with pytest.raises(RendezvousError, match=r"generation 5 from the master's store at 127\.0\.0\.1:\d+ within 0\.3s"):
        generation_env_port("127.0.0.1", master.port, 5, 0.3, poll=0.05)


def test_a_malformed_port_is_reported(master):
    client = dist.TCPStore("127.0.0.1", master.port, is_master=False, timeout=datetime.timedelta(seconds=10))
    client.set(env_port_key(4), "not-a-port")
    with pytest.raises(RendezvousError, match="malformed port for generation 4"):
        generation_env_port("127.0.0.1", master.port, 4, 5)
