"""Reading a generation's worker-store port from its master's node store (real TCPStores on loopback):
found once published, given up as soon as the generation is over (the master may be gone), a clear
error after the timeout."""

from __future__ import annotations

import threading
import time

import pytest

from resilient.agent.store_host import StoreHost, free_port, generation_env_port
from resilient.errors import RendezvousError


def test_the_port_is_read_once_the_master_publishes_it():
    master = StoreHost(timeout=30)
    published = threading.Event()

    def publish():
        published.wait(10)
        master.host_generation(7)

    t = threading.Thread(target=publish)
    t.start()
    looks = []

    def ended() -> bool:
        looks.append(1)
        if len(looks) == 2:
            published.set()  # published only after the reader has waited at least once
        return False

    port = generation_env_port("127.0.0.1", master.port, 7, 30, ended=ended, poll=0.05)
    t.join()
    assert port == master._gen_store.port
    assert len(looks) >= 2


def test_a_generation_that_ends_before_its_master_publishes_is_given_up():
    master = StoreHost(timeout=30)  # alive, never publishes generation 3
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


def test_a_master_that_never_publishes_fails_with_a_clear_error():
    master = StoreHost(timeout=30)
    with pytest.raises(RendezvousError, match=r"generation 5 from the master's store at 127\.0\.0\.1:\d+ within 0\.3s"):
        generation_env_port("127.0.0.1", master.port, 5, 0.3, poll=0.05)


def test_a_malformed_port_is_reported():
    master = StoreHost(timeout=30)
    master._node.set("resilient/gen4/env_port", "not-a-port")
    with pytest.raises(RendezvousError, match="malformed port for generation 4"):
        generation_env_port("127.0.0.1", master.port, 4, 5)
